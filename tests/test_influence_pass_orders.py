"""The per-layer math of the EK-FAC correction and per-example score passes, in the contraction
orders chosen for speed, equals the explicit dense per-example formulas (float64 numpy)."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from ideal_jax.curvature import ekfac
from ideal_jax.influence import per_example


def _orthonormal(rng, n):
    return np.linalg.qr(rng.standard_normal((n, n)))[0]


def _flops(t, i, o, rows_a, rows_g):
    """FLOPs per example of Q_Aᵀ X̃ᵀΔ Q_G in the given order (X̃ᵀΔ itself included)."""
    left = 2 * t * i * i if rows_a else 2 * i * i * o
    right = 2 * t * o * o if rows_g else 2 * i * o * o
    return left + right + 2 * t * i * o


@pytest.mark.parametrize("t, i, o", [(3, 5, 7), (6, 5, 7), (6, 7, 5), (9, 5, 7), (127, 256, 1024)])
def test_rotation_plan_is_the_cheapest_of_the_four_orders(t, i, o):
    plan = ekfac.rotation_plan(t, i, o)
    cheapest = min(_flops(t, i, o, *p) for p in itertools.product((True, False), repeat=2))
    assert _flops(t, i, o, *plan) == cheapest


# (T, I, O): rows rotated on both sides, the input side only, the output side only, neither.
@pytest.mark.parametrize("t, i, o", [(3, 5, 7), (6, 5, 7), (6, 7, 5), (9, 5, 7)])
def test_squared_projections_equal_the_dense_formula(t, i, o):
    rng = np.random.default_rng(t * 100 + i * 10 + o)
    b = 4
    x, d = rng.standard_normal((b, t, i)), rng.standard_normal((b, t, o))
    qa, qg = _orthonormal(rng, i), _orthonormal(rng, o)
    expected = sum((qa.T @ x[n].T @ d[n] @ qg) ** 2 for n in range(b))
    got = ekfac.squared_projections(*(jnp.asarray(a, jnp.float32) for a in (x, d, qa, qg)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6 * expected.max())


def test_example_dots_equal_dense_per_example_gradients():
    rng = np.random.default_rng(0)
    b, t, i, o, r = 5, 3, 4, 6, 3
    x, d = rng.standard_normal((b, t, i)), rng.standard_normal((b, t, o))
    v = rng.standard_normal((r, i, o))
    grads = np.stack([x[n].T @ d[n] for n in range(b)])  # dense per-example gradients [B, I, O]
    c, g_sum = per_example.example_dots(*(jnp.asarray(a, jnp.float32) for a in (x, d, v)))
    np.testing.assert_allclose(
        np.asarray(c), -np.einsum("nio,rio->nr", grads, v), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(g_sum), grads.sum(axis=0), rtol=1e-5, atol=1e-5)


def test_captured_correction_is_traced_once(monkeypatch):
    """Two fits over several batches (as two rounds would make): one trace of the step."""
    import chex
    import jax
    from test_curvature_models import classification_batches, mlp_params, mlp_problem

    from ideal_jax.curvature import kfac as kfac_lib

    sizes = (5, 7, 3)
    params = mlp_params(sizes)
    batches = classification_batches(sizes, 3, 8)
    curvature = kfac_lib.curvature_for(mlp_problem(params), "fisher")
    state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(0))
    step = chex.assert_max_traces(ekfac._captured_correction_step, n=1)
    monkeypatch.setitem(ekfac._STEPS, "captures", step)
    ekfac._correction_jit.cache_clear()
    try:
        for seed in (1, 2):
            ekfac.fit_eigen_correction(curvature, state, params, batches, jax.random.key(seed))
    finally:
        ekfac._correction_jit.cache_clear()
