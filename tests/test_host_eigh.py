"""K-FAC eigendecompositions on the host (curvature/kfac.py `_host_cache`, the alternative
benchmarks/bench_eigh.py measures against kfac-jax's jitted cache): the same eigenvalues,
eigenbases and inverse products."""

import jax
import numpy as np
from test_influence_per_example import _batch

from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params


def _state():
    cfg = ModelConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
        num_heads=2, num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    params = jax.tree.map(lambda x: 3 * x, init_params(cfg, jax.random.key(0)))
    layers = layers_lib.select_layers(params, "mlp")
    curvature = kfac_lib.curvature_for(problem_lib.lm_problem(cfg, layers), "empirical")
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 4, 12, 40, 0) for _ in range(3)]
    state = curvature.init(params, batches[0], jax.random.key(1))
    for i, b in enumerate(batches):
        state = curvature.update(state, params, b, jax.random.key(i))
    return curvature, params, layers, curvature._real_token_bias(state)


def test_host_eigendecompositions_equal_kfac_jax():
    curvature, params, layers, state = _state()
    device, host = curvature._cache(state), curvature._host_cache(state)
    final = curvature.finalize(state)
    for (qa, la, qg, lg), (qa2, la2, qg2, lg2), (qa3, *_) in zip(
        curvature.eigenbases(device).values(),
        curvature.eigenbases(host).values(),
        curvature.eigenbases(final).values(),
    ):
        for lam, lam2 in ((la, la2), (lg, lg2)):
            np.testing.assert_allclose(lam2, lam, rtol=1e-4, atol=1e-6 * float(np.max(lam)))
            assert np.all(np.asarray(lam2) >= 0)  # clipped like safe_psd_eigh
        for q, q2, lam in ((qa, qa2, la2), (qg, qg2, lg2)):
            # the same factor back: Q diag(λ) Qᵀ (eigenvectors agree up to sign and rotation
            # within equal eigenvalues, so compare the reconstructions)
            a1 = (np.asarray(q) * np.asarray(lam)) @ np.asarray(q).T
            a2 = (np.asarray(q2) * np.asarray(lam)) @ np.asarray(q2).T
            np.testing.assert_allclose(a2, a1, atol=1e-4 * float(np.max(np.abs(a1))))
        np.testing.assert_array_equal(np.asarray(qa3), np.asarray(qa))  # finalize: the jitted
    selected, _ = layers_lib.split_params(params, layers)
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), selected)
    damping = {p: 1e-2 for p in curvature.block_paths()}
    x_dev = curvature.multiply_inverse(device, v, damping)
    x_host = curvature.multiply_inverse(host, v, damping)
    for a, b in zip(jax.tree.leaves(x_dev), jax.tree.leaves(x_host)):
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=1e-4 * float(np.max(np.abs(a))))


def test_host_eigh_of_a_non_finite_factor_is_nan_like_kfac_jax():
    s, q = kfac_lib.host_eigh(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    assert np.all(np.isnan(s)) and np.all(np.isnan(q))
    s, q = kfac_lib.host_eigh(np.array([[2.0, 0.0], [0.0, -1e-9]]))
    np.testing.assert_allclose(s, [0.0, 2.0])
