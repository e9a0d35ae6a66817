"""The outer objective Q(β) = L(D_ref, θ*(β)) as a differentiable JAX function (Eq. 2).

θ*(β) is the minimiser of the inner problem (Eq. 1). Its derivative comes from the implicit
function theorem: at a stationary point ∇_θ F(θ*, β) = 0, so

    dθ*/dβ = −H⁻¹ ∂_β ∇_θ F(θ*, β),        H = ∇²_θ F(θ*, β),

and for any cotangent v on θ*:  v ∘ dθ*/dβ = −(∂_β ∇_θ F)ᵀ H⁻¹ v. `implicit_solution` wraps an inner
solver in a `jax.custom_vjp` whose backward pass is exactly that, with H⁻¹ supplied by the caller
(the same curvature operator the influence stage uses: identity / kfac / ekfac / exact). Then

    Q = lambda beta: ref_loss(solution(beta))

composes with jax.grad, optax and other JAX transformations, and jax.grad(Q)(0) is IDEAL's α
(Lemma 1). Two inner objectives, matching the two scalings of METHOD.md §1.1:

  "paper":  ∇_θ F = ∇L̄_tr + Σ_j β_j ∇L̄_j                        → α_j = −g_refᵀ H⁻¹ ∇L̄_j
  "exact":  ∇_θ F = (N ∇L̄_tr + Σ_j β_j |D_j| ∇L̄_j) / (N + Σ_j β_j |D_j|)   (Eq. 1 with mean losses)
            → at β = 0:  α_j = −(|D_j|/N) g_refᵀ H⁻¹ (∇L̄_j − ∇L̄_tr)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def implicit_solution(
    inner_solver: Callable[[jax.Array], PyTree],
    inner_grad: Callable[[PyTree, jax.Array], PyTree],
    inverse_hvp: Callable[[PyTree, jax.Array, PyTree], PyTree],
) -> Callable[[jax.Array], PyTree]:
    """θ*(β) with a custom VJP from the implicit function theorem.

    inner_solver(β) -> θ*: any solver (closed form, a training run, or the parameters trained at the
      current mixture); it is never differentiated.
    inner_grad(θ, β) -> ∇_θ F(θ, β): differentiated with respect to β only.
    inverse_hvp(θ, β, v) -> H(θ, β)⁻¹ v: the curvature operator.
    """

    @jax.custom_vjp
    def solution(beta_j):
        return inner_solver(beta_j)

    def forward(beta_j):
        theta = inner_solver(beta_j)
        return theta, (theta, beta_j)

    def backward(residuals, v_theta):
        theta, beta_j = residuals
        u_theta = inverse_hvp(theta, beta_j, v_theta)
        _, vjp = jax.vjp(lambda b: inner_grad(theta, b), beta_j)
        (d_beta_j,) = vjp(u_theta)
        return (-d_beta_j,)

    solution.defvjp(forward, backward)
    return solution


def linear_inner_grad(
    train_grad: PyTree,
    domain_grads: Sequence[PyTree],
    domain_sizes: Sequence[int] | None = None,
    scaling: str = "paper",
):
    """∇_θ F(θ*, β) from precomputed mean gradients at θ* (what the influence stage has).

    The gradients are fixed at θ*, so this is exact for derivatives at θ* — all IDEAL needs.
    """
    stacked = jax.tree.map(lambda *g: jnp.stack(g), *domain_grads)  # leading axis J
    if scaling == "paper":

        def inner_grad(theta, beta_j):
            del theta
            return jax.tree.map(
                lambda tr, g_j: tr + jnp.tensordot(beta_j, g_j, axes=1), train_grad, stacked
            )

    elif scaling == "exact":
        if domain_sizes is None:
            raise ValueError("scaling='exact' needs domain_sizes")
        sizes_j = jnp.asarray(domain_sizes, jnp.float32)
        total = jnp.sum(sizes_j)

        def inner_grad(theta, beta_j):
            del theta
            denom = total + jnp.dot(beta_j, sizes_j)
            return jax.tree.map(
                lambda tr, g_j: (total * tr + jnp.tensordot(beta_j * sizes_j, g_j, axes=1)) / denom,
                train_grad,
                stacked,
            )

    else:
        raise ValueError(f"scaling must be 'paper' or 'exact', got {scaling!r}")
    return inner_grad


def ideal_outer_objective(
    theta_star: PyTree,
    ref_loss: Callable[[PyTree], jax.Array],
    train_grad: PyTree,
    domain_grads: Sequence[PyTree],
    inverse_hvp: Callable[[PyTree], PyTree],
    *,
    domain_sizes: Sequence[int] | None = None,
    scaling: str = "paper",
) -> Callable[[jax.Array], jax.Array]:
    """Q(β) around a trained model: value L_ref(θ*), gradient the IDEAL hypergradient α.

    theta_star: the parameters trained on the current mixture (the restricted subset of layers the
      curvature covers); inverse_hvp(v) applies the influence stage's H⁻¹ to a pytree like theta.
    Valid for derivatives at the trained mixture (β = 0), which is where IDEAL takes its step.
    """
    solution = implicit_solution(
        inner_solver=lambda beta_j: theta_star,
        inner_grad=linear_inner_grad(train_grad, domain_grads, domain_sizes, scaling),
        inverse_hvp=lambda theta, beta_j, v: inverse_hvp(v),
    )
    return lambda beta_j: ref_loss(solution(beta_j))


def beta_from_proportions(
    proportions_j: jax.Array, sizes_j: Sequence[int], total: float | None = None
) -> jax.Array:
    """β such that domain j gets proportions_j · total examples (total defaults to N)."""
    sizes_j = jnp.asarray(sizes_j, jnp.float32)
    total = jnp.sum(sizes_j) if total is None else total
    return proportions_j * total / sizes_j - 1.0
