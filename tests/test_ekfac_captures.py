"""The batched EK-FAC correction (one backward pass per batch, captured layer inputs/output
gradients) gives the same Λ* as the per-row reference (a whole-model backward pass per example)."""

import jax
import numpy as np
import pytest
from test_curvature_models import (
    classification_batches,
    lm_batches,
    mlp_params,
    mlp_problem,
    tiny_lm,
)

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib


def _both(curvature, params, batches, unit):
    state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(0))
    fit = lambda impl: ekfac_lib.fit_eigen_correction(
        curvature,
        state,
        params,
        batches,
        jax.random.key(1),
        unit=unit,
        chunk_size=2,
        implementation=impl,
    )
    return fit("per_row").correction, fit("captures").correction


@pytest.mark.parametrize("mode, length", [("fisher", 8), ("empirical", 24)])
def test_lm_captured_correction_equals_per_row(mode, length):
    """Decoder LM (padding, prompt tokens), per-example units; the fisher case also checks that
    targets are drawn with the same per-row keys. Length 8 projects the rows first, length 24
    forms X̃ᵀΔ first (the cheaper order for those shapes)."""
    cfg, params = tiny_lm()
    batches = lm_batches(cfg.vocab_size, 2, 4, length)
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    reference, batched = _both(kfac_lib.curvature_for(problem, mode), params, batches, "example")
    assert set(batched) == set(problem.layers)
    for path in reference:
        ref = np.asarray(reference[path])
        np.testing.assert_allclose(batched[path], ref, rtol=1e-5, atol=1e-6 * ref.max())


@pytest.mark.parametrize("unit", ["example", "batch"])
def test_mlp_captured_correction_equals_per_row_with_bias(unit):
    params = mlp_params((5, 7, 3))
    batches = classification_batches((5, 7, 3), 2, 8)
    curvature = kfac_lib.curvature_for(mlp_problem(params), "fisher")
    reference, batched = _both(curvature, params, batches, unit)
    assert reference["fc0"].shape == (6, 7)  # kernel rows + the bias row
    for path in reference:
        ref = np.asarray(reference[path])
        np.testing.assert_allclose(batched[path], ref, rtol=5e-5, atol=1e-6 * ref.max())
