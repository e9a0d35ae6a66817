"""β update rules: the paper's max-normalised step, bounds, minimum volume, optax."""

import numpy as np
import pytest

from ideal_jax import reweight


def test_max_normalized_step_moves_largest_by_m():
    alpha = np.array([0.02, -0.5, 0.1, 0.0])
    beta = reweight.max_normalized_step(alpha, 0.15)
    np.testing.assert_allclose(beta, [-0.006, 0.15, -0.03, 0.0])
    assert np.all(reweight.max_normalized_step(np.zeros(3), 0.15) == 0)


def test_non_finite_alpha_is_an_error():
    with pytest.raises(ValueError, match="non-finite"):
        reweight.max_normalized_step(np.array([1.0, np.nan]), 0.15)


def test_bounds_and_minimum_volume():
    cfg = reweight.ReweightConfig(beta_min=-0.5, beta_max=0.2, min_volume=8)
    beta = reweight.project_beta(np.array([-0.9, 0.9, -0.3]), [100, 100, 10], cfg)
    np.testing.assert_allclose(beta, [-0.5, 0.2, -0.2])


def test_optax_rule_descends_along_alpha_and_keeps_state():
    cfg = reweight.ReweightConfig(rule="optax", optimizer="sgd", learning_rate=2.0)
    alpha = np.array([0.1, -0.05])
    beta, state = reweight.compute_beta(alpha, [50, 50], cfg)
    np.testing.assert_allclose(beta, [-0.2, 0.1], rtol=1e-6)
    beta2, _ = reweight.compute_beta(alpha, [50, 50], cfg, previous_beta_j=beta, opt_state=state)
    np.testing.assert_allclose(beta2, [-0.4, 0.2], rtol=1e-6)
    adam = reweight.ReweightConfig(rule="optax", optimizer="adam", learning_rate=0.1)
    beta, _ = reweight.compute_beta(alpha, [50, 50], adam)
    assert beta[0] < 0 < beta[1]


def test_unknown_rule_and_optimizer():
    with pytest.raises(ValueError, match="rule"):
        reweight.compute_beta(np.ones(2), [1, 1], reweight.ReweightConfig(rule="doremi"))
    with pytest.raises(ValueError, match="optax optimizer"):
        reweight.compute_beta(
            np.ones(2), [1, 1], reweight.ReweightConfig(rule="optax", optimizer="nope")
        )
