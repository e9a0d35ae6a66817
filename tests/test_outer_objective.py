"""The differentiable outer objective.

- implicit_solution: least squares, where the inner problem (Eq. 1) has a closed-form solution, so
  Q(β) is exact and its finite-difference derivative is the ground truth for the custom VJP;
- Q over proportions from the influence stage's pieces (tests/test_outer_objective_lm.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ideal_jax.influence import outer_objective as oo


@pytest.fixture(autouse=True)
def _float64():
    # Finite differences need float64; scoped so other test modules keep float32.
    with jax.enable_x64(True):
        yield


def _problem(seed=0, sizes=(30, 50, 20, 40), dim=5):
    rng = np.random.default_rng(seed)
    theta_true = rng.normal(size=dim)
    xs, ys = [], []
    for j, n in enumerate(sizes):
        x = rng.normal(size=(n, dim)) + j * 0.3  # domains differ in their input distribution
        shift = rng.normal(size=dim) * 0.5  # ... and in their optimum
        xs.append(jnp.asarray(x))
        ys.append(jnp.asarray(x @ (theta_true + shift) + 0.1 * rng.normal(size=n)))
    x_ref = jnp.asarray(rng.normal(size=(60, dim)))
    y_ref = x_ref @ jnp.asarray(theta_true)
    return xs, ys, x_ref, y_ref, jnp.asarray(sizes, jnp.float64)


def _setup(seed=0):
    xs, ys, x_ref, y_ref, sizes_j = _problem(seed)

    def inner_objective(theta, beta_j):  # Eq. 1 with per-domain sum losses
        sums = jnp.stack([jnp.sum((x @ theta - y) ** 2) / 2 for x, y in zip(xs, ys)])
        return jnp.sum((1 + beta_j) * sums) / (jnp.sum(sizes_j) + jnp.dot(beta_j, sizes_j))

    def solve(beta_j):  # weighted normal equations
        a = sum((1 + b) * x.T @ x for b, x in zip(beta_j, xs))
        rhs = sum((1 + b) * x.T @ y for b, x, y in zip(beta_j, xs, ys))
        return jnp.linalg.solve(a, rhs)

    def ref_loss(theta):
        return jnp.mean((x_ref @ theta - y_ref) ** 2) / 2

    inner_grad = jax.grad(inner_objective)

    def inverse_hvp(theta, beta_j, v):
        return jnp.linalg.solve(jax.hessian(inner_objective)(theta, beta_j), v)

    return solve, inner_grad, inverse_hvp, ref_loss, inner_objective, xs, ys, sizes_j


def _finite_difference(q, beta_j, eps=1e-5):
    return np.array(
        [
            (q(beta_j.at[j].add(eps)) - q(beta_j.at[j].add(-eps))) / (2 * eps)
            for j in range(beta_j.shape[0])
        ]
    )


def test_grad_matches_finite_differences_at_any_beta():
    solve, inner_grad, inverse_hvp, ref_loss, *_ = _setup()
    solution = oo.implicit_solution(solve, inner_grad, inverse_hvp)
    q = lambda beta_j: ref_loss(solution(beta_j))
    for beta_j in (jnp.zeros(4), jnp.asarray([0.3, -0.2, 0.5, -0.4])):
        grad = jax.grad(q)(beta_j)
        exact = _finite_difference(lambda b: ref_loss(solve(b)), beta_j)
        np.testing.assert_allclose(grad, exact, rtol=1e-6, atol=1e-9)
    # Composes with jit and vmap.
    batch = jnp.asarray([[0.0, 0.1, 0.0, 0.0], [0.2, 0.0, -0.1, 0.0]])
    grads = jax.jit(jax.vmap(jax.grad(q)))(batch)
    np.testing.assert_allclose(grads[1], jax.grad(q)(batch[1]), rtol=1e-10)


def test_beta_from_proportions():
    sizes = [10, 30, 60]
    beta = oo.beta_from_proportions(jnp.asarray([0.1, 0.3, 0.6]), sizes)
    np.testing.assert_allclose(beta, 0.0, atol=1e-12)
    beta = oo.beta_from_proportions(jnp.asarray([0.2, 0.3, 0.5]), sizes)
    np.testing.assert_allclose((1 + beta) * jnp.asarray(sizes), [20, 30, 50])
