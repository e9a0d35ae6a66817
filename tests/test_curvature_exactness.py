"""Cases where K-FAC / EK-FAC are provably exact: they must match the dense inverse to 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import ortho_group
from test_curvature_models import lm_batches, mlp_problem, tiny_lm

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib


def _rel_err(a, b):
    fa, fb = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def _random_like(tree, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def _build(name, problem, params, batches, curvature=None, state=None, kind="empirical"):
    return operators.build_operator(
        name,
        problem=problem,
        params=params,
        curvature=curvature,
        state=state,
        batches=batches,
        exact_kind=kind,
        damping=0.1,
        relative_damping=True,
    )


def test_kfac_exact_for_linear_least_squares():
    """½‖Wx + b − t‖²: the Hessian is A ⊗ I exactly, so K-FAC (ggn_exact) is exact."""
    rng = np.random.default_rng(0)
    params = {
        "fc0": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        }
    }
    batches = [
        {
            "inputs": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            "targets": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
            "weights": jnp.ones(8, jnp.float32),
        }
        for _ in range(3)
    ]
    problem = mlp_problem(params, loss="squared_error")
    curvature = kfac_lib.KfacCurvature(problem, "ggn_exact")
    state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(0))
    v = _random_like(layers_lib.split_params(params, problem.layers)[0])
    exact = _build("exact", problem, params, batches, kind="hessian")(v)
    assert _rel_err(_build("kfac", problem, params, batches, curvature, state)(v), exact) < 1e-4


def test_ekfac_exact_when_fisher_is_diagonal_in_kronecker_eigenbasis():
    """Per-example gradients x_n δ_nᵀ with x_n, δ_n along (rotated) eigenvectors: the empirical
    Fisher is diagonal in Q_A ⊗ Q_G but not Kronecker — EK-FAC is exact, K-FAC is not."""
    d_in, d_out = 4, 3
    rng = np.random.default_rng(3)
    r_in, r_out = ortho_group.rvs(d_in, random_state=1), ortho_group.rvs(d_out, random_state=2)
    pairs = [(i, j) for i in range(d_in) for j in range(d_out)]
    a = rng.uniform(0.5, 2.0, len(pairs))
    b = rng.uniform(0.5, 2.0, len(pairs))
    x = np.stack([a[n] * r_in[:, i] for n, (i, _) in enumerate(pairs)])
    delta = np.stack([b[n] * r_out[:, j] for n, (_, j) in enumerate(pairs)])
    kernel = rng.normal(size=(d_in, d_out))
    params = {"fc0": {"kernel": jnp.asarray(kernel, jnp.float32)}}
    batch = {
        "inputs": jnp.asarray(x, jnp.float32),
        "targets": jnp.asarray(x @ kernel - delta, jnp.float32),  # so that y − t = δ
        "weights": jnp.ones(len(pairs), jnp.float32),
    }
    problem = mlp_problem(params, loss="squared_error")
    curvature = kfac_lib.KfacCurvature(problem, "empirical")
    state = kfac_lib.accumulate_factors(curvature, params, [batch], jax.random.key(0))
    state = ekfac_lib.fit_eigen_correction(curvature, state, params, [batch], jax.random.key(1))
    v = _random_like(layers_lib.split_params(params, problem.layers)[0])
    exact = _build("exact", problem, params, [batch])(v)
    assert _rel_err(_build("ekfac", problem, params, [batch], curvature, state)(v), exact) < 1e-4
    assert _rel_err(_build("kfac", problem, params, [batch], curvature, state)(v), exact) > 1e-2


def test_lm_single_token_all_operators_agree():
    """Decoder LM, one real token: every layer's empirical Fisher block is (xxᵀ) ⊗ (δδᵀ), so
    K-FAC, EK-FAC and the exact block-diagonal inverse coincide (tags, masks and scales)."""
    cfg, params = tiny_lm()
    batch = lm_batches(cfg.vocab_size, 1, 2, 6)[0]
    seg = np.zeros((2, 6), np.int32)
    seg[0, 0] = 1
    batch = {
        **batch,
        "segment_ids": jnp.asarray(seg),
        "weights": jnp.asarray(seg, jnp.float32),
        "positions": jnp.zeros((2, 6), jnp.int32),
    }
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    curvature = kfac_lib.KfacCurvature(problem, "empirical")
    state = kfac_lib.accumulate_factors(curvature, params, [batch], jax.random.key(0))
    state = ekfac_lib.fit_eigen_correction(curvature, state, params, [batch], jax.random.key(1))
    v = _random_like(layers_lib.split_params(params, problem.layers)[0])
    exact = _build("exact_block", problem, params, [batch])(v)
    for name in ("kfac", "ekfac"):
        assert _rel_err(_build(name, problem, params, [batch], curvature, state)(v), exact) < 1e-4


def test_kfac_bias_factor_counts_real_tokens_only():
    """Biased layer, padded rows (x = 0, weight 0): K-FAC (ggn_exact) is still the exact Hessian.

    kfac-jax appends a 1 to every row's input, padding included; without the real-token correction
    A[bias, bias] is 1 instead of the real-token share and the inverse is off by 0.4–0.7 (relative).
    """
    rng = np.random.default_rng(3)
    params = {
        "fc0": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        }
    }
    batches = []
    for real in (3, 1, 2):  # of 12 rows each: mostly padding, as in short answers
        mask = (np.arange(12) < real).astype(np.float32)
        batches.append(
            {
                "inputs": jnp.asarray(
                    rng.normal(size=(12, 4)) * mask[:, None] + 1.0 * mask[:, None], jnp.float32
                ),
                "targets": jnp.asarray(rng.normal(size=(12, 3)), jnp.float32),
                "weights": jnp.asarray(mask),
                "segment_ids": jnp.asarray(mask.astype(np.int32)),
            }
        )
    layers = layers_lib.select_layers(params, r"fc\d+")
    problem = problem_lib.CurvatureProblem(
        mlp_problem(params).outputs_fn, layers, loss="squared_error", token_mask_key="segment_ids"
    )
    curvature = kfac_lib.KfacCurvature(problem, "ggn_exact")
    state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(0))
    v = _random_like(layers_lib.split_params(params, problem.layers)[0])
    exact = _build("exact", problem, params, batches, kind="hessian")(v)
    assert _rel_err(_build("kfac", problem, params, batches, curvature, state)(v), exact) < 1e-4
