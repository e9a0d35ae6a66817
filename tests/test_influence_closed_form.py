"""Linear least squares, where θ*(β) and Q(β) are closed-form: α must equal dQ/dβ (Eq. 1–2)."""

import jax
import jax.numpy as jnp
import numpy as np
from test_curvature_models import mlp_problem

from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import operators
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients

D_IN, D_OUT, SIZES = 3, 2, (40, 24, 32, 16)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    xs, ts, doms = [], [], []
    for j, n in enumerate(SIZES):  # each domain has its own inputs and its own linear rule
        x = rng.normal(size=(n, D_IN)) + rng.normal(size=D_IN)
        t = (
            x @ rng.normal(size=(D_IN, D_OUT))
            + rng.normal(size=D_OUT)
            + 0.1 * rng.normal(size=(n, D_OUT))
        )
        xs.append(x), ts.append(t), doms.append(np.full(n, j))
    x_ref = rng.normal(size=(30, D_IN))
    t_ref = x_ref @ rng.normal(size=(D_IN, D_OUT))
    return np.concatenate(xs), np.concatenate(ts), np.concatenate(doms), x_ref, t_ref


def _theta_star(x, t, example_weights):
    """argmin Σ_n c_n ½‖[x,1]θ − t‖² (weighted least squares; the normaliser does not move it)."""
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return np.linalg.solve(
        xa.T @ (example_weights[:, None] * xa), xa.T @ (example_weights[:, None] * t)
    )


def _q(beta, x, t, doms, x_ref, t_ref):
    theta = _theta_star(x, t, 1.0 + beta[doms])
    pred = np.concatenate([x_ref, np.ones((len(x_ref), 1))], axis=1) @ theta
    return np.mean(0.5 * np.sum((pred - t_ref) ** 2, axis=1))  # Eq. 2


def test_alpha_equals_finite_difference_of_q():
    x, t, doms, x_ref, t_ref = _data()
    theta = _theta_star(x, t, np.ones(len(x)))
    params = {
        "fc0": {
            "kernel": jnp.asarray(theta[:-1], jnp.float32),
            "bias": jnp.asarray(theta[-1], jnp.float32),
        }
    }
    train = [
        {
            "inputs": jnp.asarray(x, jnp.float32),
            "targets": jnp.asarray(t, jnp.float32),
            "weights": jnp.ones(len(x), jnp.float32),
            "domain_ids": jnp.asarray(doms),
        }
    ]
    reference = [
        {
            "inputs": jnp.asarray(x_ref, jnp.float32),
            "targets": jnp.asarray(t_ref, jnp.float32),
            "weights": jnp.ones(len(x_ref), jnp.float32),
            "domain_ids": jnp.zeros(len(x_ref), jnp.int32),
        }
    ]
    problem = mlp_problem(params, loss="squared_error")
    names = tuple(f"d{j}" for j in range(len(SIZES)))
    dom = gradients.group_mean_gradients(problem, params, train, names)
    ref = gradients.group_mean_gradients(problem, params, reference, ("all",))
    eps = 1e-5
    fd = np.array(
        [
            (
                _q(eps * np.eye(4)[j], x, t, doms, x_ref, t_ref)
                - _q(-eps * np.eye(4)[j], x, t, doms, x_ref, t_ref)
            )
            / (2 * eps)
            for j in range(4)
        ]
    )
    curvature = kfac_lib.KfacCurvature(problem, "ggn_exact")
    state = kfac_lib.accumulate_factors(curvature, params, train, jax.random.key(0))
    frac = np.asarray(SIZES) / sum(SIZES)
    for name in ("exact", "kfac"):  # K-FAC is exact for one linear layer with squared error
        op = operators.build_operator(
            name,
            problem=problem,
            params=params,
            damping=0.0,
            relative_damping=False,
            curvature=curvature,
            state=state,
            batches=train,
            exact_kind="hessian",
        )
        exact = alpha_lib.compute_alpha(ref, dom, op, layers=problem.layers, scaling="exact")
        paper = alpha_lib.compute_alpha(ref, dom, op, layers=problem.layers, scaling="paper")
        np.testing.assert_allclose(exact.row("all"), fd, rtol=2e-3, atol=1e-5)
        # at the stationary point ∇L̄_tr = 0, so exact = (n_j / N) · paper
        np.testing.assert_allclose(frac * paper.row("all"), fd, rtol=2e-3, atol=1e-5)
        assert exact.to_json()["scaling"] == "exact" and len(exact.to_json()["matrix"]) == 1
