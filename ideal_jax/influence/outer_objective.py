"""The outer objective Q over domain proportions, differentiable in JAX (Eq. 2 of the paper).

With mean losses the inner problem (Eq. 1) depends on the volumes only through the proportions
w_j = (1 + β_j) n_j / Σ_k (1 + β_k) n_k on the simplex:  θ*(w) = argmin_θ Σ_j w_j L̄_j(θ).
The trained model θ* minimises it at the current proportions p (the round's mixture D_k). Around
it, one Newton step of the inner problem gives θ's first-order response to new proportions:

    θ(w) = θ* − H⁻¹ Σ_j (w_j − p_j) ∇L̄_j(θ*) = θ* − Σ_j (w_j − p_j) u_j,     u_j = H⁻¹ ∇L̄_j

with H and ∇L̄_j the influence stage's curvature operator and domain gradients. Then

    Q(w) = L_ref(θ(w))                      (L_ref: the reference loss the "all" row of α uses)

is a JAX function of w that really changes with w (L_ref is evaluated at θ(w), not at θ*), and
  ∂Q/∂w_j at w = p  =  −∇L_refᵀ H⁻¹ ∇L̄_j  =  α_j with "paper" scaling,
  ∂Q/∂β_j at β = 0  =  p_j (α_j − Σ_k p_k α_k)  =  α_j with "exact" scaling.
Away from p, jax.grad(Q) is the exact derivative of this Q (tests compare it with finite
differences). Q does not depend on the total volume (mean losses); the total is the caller's
separate choice (keep it: `keep_total`, or let it drift).

`optimise` takes several optax steps on Q inside a trust region: the proportions are softmax logits
(gradients divided by the largest logit gradient at p, so the learning rate is in log-proportion),
and after each step w is projected onto {w ∈ simplex : |w_j / p_j − 1| ≤ m}, so that with the total
kept no domain's volume moves by more than m in a round. Far from p the first-order response
overshoots (on an under-trained model H⁻¹∇L̄_j is large) and Q rises again, so a step that would
raise Q is refused and the step length shrinks (×0.3), growing back (×1.5) after accepted steps:
Q never increases along the way. The loop is one jitted `lax.scan`.

`implicit_solution` is the general form for an inner solver that really re-solves θ*(β) (closed
forms, small models): a custom VJP from the implicit function theorem.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ideal_jax.utils.errors import InputError

PyTree = Any


def implicit_solution(
    inner_solver: Callable[[jax.Array], PyTree],
    inner_grad: Callable[[PyTree, jax.Array], PyTree],
    inverse_hvp: Callable[[PyTree, jax.Array, PyTree], PyTree],
) -> Callable[[jax.Array], PyTree]:
    """θ*(β) with a custom VJP from the implicit function theorem.

    inner_solver(β) -> θ*: a solver that really re-solves the inner problem (closed form, Newton);
      it is never differentiated.
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


@flax.struct.dataclass
class OuterProblem:
    """What Q needs from a round: θ*, the directions u_j = H⁻¹ ∇L̄_j, p, and L_ref.

    A pytree (jit arguments, never baked-in constants), with the reference loss as static code:
    theta_star: the curvature-covered parameters trained on D_k ({path: {kernel, ...}}).
    directions: the same tree with a leading [J] axis: u_j for every domain j.
    proportions: p_j, D_k's share of each domain's loss weight (sums to 1).
    ref_args: the reference loss's data (the other parameters, the reference batches).
    ref_loss(θ, ref_args) -> the reference loss, a JAX function.
    """

    theta_star: PyTree
    directions: PyTree
    proportions: jax.Array
    ref_args: PyTree
    ref_loss: Callable[[PyTree, PyTree], jax.Array] = flax.struct.field(pytree_node=False)


def response(problem: OuterProblem, w_j: jax.Array) -> PyTree:
    """θ(w) = θ* − Σ_j (w_j − p_j) u_j (first-order response of the trained model)."""
    dw_j = jnp.asarray(w_j, jnp.float32) - jnp.asarray(problem.proportions, jnp.float32)
    return jax.tree.map(
        lambda t, u: t - jnp.tensordot(dw_j, u, axes=1).astype(t.dtype),
        problem.theta_star,
        problem.directions,
    )


def objective(problem: OuterProblem) -> Callable[[jax.Array], jax.Array]:
    """Q(w) = L_ref(θ(w)) over proportions w (differentiable; jax.grad at p is α, paper scaling)."""
    return lambda w_j: problem.ref_loss(response(problem, w_j), problem.ref_args)


def proportions_from_beta(beta_j: jax.Array, sizes_j: Sequence[float]) -> jax.Array:
    """w_j = (1 + β_j) n_j / Σ_k (1 + β_k) n_k."""
    v_j = (1.0 + jnp.asarray(beta_j)) * jnp.asarray(sizes_j, jnp.asarray(beta_j).dtype)
    return v_j / jnp.sum(v_j)


def objective_of_beta(problem: OuterProblem, sizes_j: Sequence[float]):
    """Q(β) = Q(w(β)); jax.grad at β = 0 is α with "exact" scaling."""
    q = objective(problem)
    return lambda beta_j: q(proportions_from_beta(beta_j, sizes_j))


def beta_from_proportions(
    proportions_j: jax.Array, sizes_j: Sequence[int], total: float | None = None
) -> jax.Array:
    """β such that domain j gets proportions_j · total examples (total defaults to N = Σ n_j)."""
    sizes_j = jnp.asarray(sizes_j, jnp.float32)
    total = jnp.sum(sizes_j) if total is None else total
    return proportions_j * total / sizes_j - 1.0


def project_trust_region(w_j: jax.Array, p_j: jax.Array, m: float, iters: int = 60) -> jax.Array:
    """w mapped into {w ∈ simplex : |w_j / p_j − 1| ≤ m}: w_j / p_j − 1 shifted by one common
    constant and clipped (bisection on the constant; jit-able)."""
    b_j = w_j / p_j - 1.0

    def excess(c):  # Σ_j p_j clip(b_j − c) is decreasing in c; its root keeps Σ w = 1
        return jnp.sum(p_j * jnp.clip(b_j - c, -m, m))

    def body(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        big = excess(mid) > 0
        return jnp.where(big, mid, lo), jnp.where(big, hi, mid)

    span = jnp.max(jnp.abs(b_j)) + m + 1.0
    lo, hi = jax.lax.fori_loop(0, iters, body, (-span, span))
    return p_j * (1.0 + jnp.clip(b_j - 0.5 * (lo + hi), -m, m))


@dataclasses.dataclass(frozen=True)
class OuterResult:
    proportions: np.ndarray  # the last accepted w (p itself if no step lowered Q)
    values: np.ndarray  # Q before the first step, then after every step (non-increasing)
    grad_at_start: np.ndarray  # ∂Q/∂w at p (= α, paper scaling)
    steps: int


def optimise(
    problem: OuterProblem,
    *,
    trust_region: float,
    optimizer: optax.GradientTransformation,
    steps: int,
) -> OuterResult:
    """`steps` optax steps on Q(softmax(z)) from z = log p, each followed by the trust-region
    projection, with step-length control (module docstring); one jitted scan. Raises InputError
    if Q or its gradient is not finite."""
    if not trust_region > 0:
        raise InputError(f"must be > 0, got {trust_region}", field="reweight.step_size")
    if steps < 1:
        raise InputError(f"must be ≥ 1, got {steps}", field="reweight.outer_steps")
    w, values, g0 = _optimise_jit(optimizer, int(steps), float(trust_region))(problem)
    values, g0 = np.asarray(values, np.float64), np.asarray(g0, np.float64)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(g0))):
        raise InputError(
            f"the outer objective is not finite (Q along the steps: {values.tolist()})",
            field="reweight.rule",
        )
    return OuterResult(np.asarray(w, np.float64), values, g0, steps)


@functools.lru_cache(maxsize=8)
def _optimise_jit(optimizer: optax.GradientTransformation, steps: int, m: float):
    @jax.jit
    def run(problem: OuterProblem):
        q = objective(problem)
        p = problem.proportions
        z0 = jnp.log(p)
        q0, g0 = jax.value_and_grad(q)(p)
        q_of_z = lambda z: q(jax.nn.softmax(z))
        # Scale-free: gradients in units of the largest logit gradient at p, so the learning rate
        # is a change of log-proportion per step whatever the size of α.
        scale = jnp.maximum(jnp.max(jnp.abs(jax.grad(q_of_z)(z0))), 1e-30)

        def step(carry, _):
            z, state, q_z, gain = carry
            g_z = jax.grad(q_of_z)(z) / scale
            updates, state = optimizer.update(g_z, state, z)
            w = project_trust_region(jax.nn.softmax(z + gain * updates), p, m)
            q_w = q(w)
            # The first-order model is not convex far from p: a step that raises Q is refused
            # and the step shrinks (×0.3); an accepted one lets it grow back (×1.5, at most 1).
            better = q_w < q_z
            z = jnp.where(better, jnp.log(jnp.maximum(w, 1e-30)), z)  # m ≥ 1: a domain may reach 0
            gain = jnp.where(better, jnp.minimum(gain * 1.5, 1.0), gain * 0.3)
            q_z = jnp.where(better, q_w, q_z)
            return (z, state, q_z, gain), q_z

        init = (z0, optimizer.init(z0), q0, jnp.ones((), jnp.float32))
        (z, _, _, _), values = jax.lax.scan(step, init, None, length=steps)
        return jax.nn.softmax(z), jnp.concatenate([q0[None], values]), g0

    return run
