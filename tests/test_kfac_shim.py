"""The kfac-jax compatibility shim: idempotent, and a real curvature update + inverse runs."""

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

from ideal_jax.compat import kfac_jax_shim


def test_shim_is_idempotent_and_probe_passes():
    first = kfac_jax_shim.apply()
    assert kfac_jax_shim.apply() == first
    assert not kfac_jax_shim._probe_fails()


def test_real_kfac_update_and_inverse():
    kfac_jax_shim.apply()

    def loss(params, batch):
        x, y = batch
        h = kfac_jax.register_dense(x @ params["w"] + params["b"], x, params["w"], params["b"])
        kfac_jax.register_softmax_cross_entropy_loss(h, y)
        return jnp.mean(-jax.nn.log_softmax(h)[jnp.arange(y.shape[0]), y])

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    batch = (jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8)))
    est = kfac_jax.BlockDiagonalCurvature(loss, default_estimation_mode="fisher_empirical")
    state = est.init(
        jax.random.key(0),
        (params, batch),
        exact_powers_to_cache=-1,
        approx_powers_to_cache=None,
        cache_eigenvalues=True,
    )
    state = jax.jit(
        lambda s: est.update_curvature_matrix_estimate(
            s, 1.0, 8.0, 0.0, 8, jax.random.key(1), (params, batch)
        )
    )(state)
    state = est.update_cache(state, 0.0, -1, None, True, None)
    out = est.multiply_inverse(state, params, 0.1, True, True, None)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    assert float(jnp.abs(out["w"]).sum()) > 0
