"""step_agreement.py: the step agreement and s.e. coverage the budget benchmark reports."""

import numpy as np
import pytest

from ideal_jax import step_agreement as agreement


def test_step_agreement_by_hand():
    # keep_total=False: d = −α, β/m = d / max|d|.
    alpha, ref = [1.0, -2.0, 0.5], [2.0, -1.0, -1.0]
    b, r = np.array([-0.5, 1.0, -0.25]), np.array([-1.0, 0.5, 0.5])
    out = agreement.step_agreement(alpha, ref, [1, 1, 2], keep_total=False)
    assert out["cosine"] == pytest.approx(b @ r / np.linalg.norm(b) / np.linalg.norm(r))
    assert out["max_dbeta"] == pytest.approx(0.75)
    assert out["sign_agree"] == pytest.approx(2 / 3)


def test_step_agreement_keep_total_and_scale():
    # keep_total: d = −(α − Σ p α) with p = n / N; sizes [1, 3]: Σ p α = (1·4 + 3·0) / 4 = 1,
    # d = [−3, 1], β/m = [−1, 1/3]. α and 10 α give the same step; −α the opposite one.
    alpha = np.array([4.0, 0.0])
    np.testing.assert_allclose(agreement.unit_step(alpha, [1, 3], True), [-1.0, 1 / 3])
    same = agreement.step_agreement(10 * alpha, alpha, [1, 3], keep_total=True)
    assert same == pytest.approx({"cosine": 1.0, "max_dbeta": 0.0, "sign_agree": 1.0})
    flip = agreement.step_agreement(-alpha, alpha, [1, 3], keep_total=True)
    assert flip == pytest.approx({"cosine": -1.0, "max_dbeta": 2.0, "sign_agree": 0.0})


def test_se_coverage_by_hand():
    # |α − ref| = [0, 3, 1.5] against 2 s.e. = [2, 2, 2]: two of three covered (one at z = 1).
    cover = agreement.se_coverage([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [1.0, 5.0, 1.5], z=2.0)
    assert cover == pytest.approx(2 / 3)
    assert agreement.se_coverage([1.0], [1.0], [2.5], z=1.0) == 0.0
