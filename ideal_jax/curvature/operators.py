"""Inverse-Hessian product operators v ↦ (H + λ)⁻¹ v for Lemma 1, selectable by name.

  identity     v itself (no curvature: α becomes a gradient alignment)
  kfac         kfac-jax's damped Kronecker inverse, (s·A⊗G + λ_b)⁻¹ per layer block
  ekfac        eigenvalue-corrected K-FAC (ekfac.py)
  exact        dense curvature (hessian / ggn / empirical) of all selected layers, solved densely
  exact_block  the same dense curvature with cross-layer blocks zeroed (what K-FAC approximates)
  cg           conjugate gradient with curvature-vector products (larger models)

Damping λ_b is per layer block: absolute, or `damping` × the block's mean eigenvalue (relative,
Kronfluence's default 0.1) — for dense/CG operators the mean eigenvalue is trace/dim of the block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import exact as exact_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.kfac import CurvatureState, KfacCurvature, block_damping
from ideal_jax.curvature.problem import Batch, CurvatureProblem, Params
from ideal_jax.utils.errors import InputError

OPERATORS = ("identity", "kfac", "ekfac", "exact", "exact_block", "cg")


@dataclasses.dataclass(frozen=True)
class InverseOperator:
    """A named inverse-curvature product over selected-layer pytrees ({path: {kernel, bias}})."""

    name: str
    damping: dict  # path → absolute λ_b actually used
    apply: Callable[[dict], dict]
    # optional: [v_1, ..., v_R] ↦ [H⁻¹v_1, ...] in one go (cg: one batched product per step)
    apply_many: Callable[[list], list] | None = None
    info: dict = dataclasses.field(default_factory=dict)  # e.g. cg iterations and residuals

    def __call__(self, vector: dict) -> dict:
        return self.apply(vector)

    def many(self, vectors: Sequence[dict]) -> list[dict]:
        """[H⁻¹ v for v in vectors] (batched where the operator can)."""
        vectors = list(vectors)
        if self.apply_many is None or not vectors:
            return [self.apply(v) for v in vectors]
        return self.apply_many(vectors)

    def describe(self) -> dict:
        """JSON-ready summary (influence.json)."""
        return {
            "operator": self.name,
            "damping_per_layer": {p: float(v) for p, v in self.damping.items()},
        }


def needs_batches(name: str) -> bool:
    """Whether operator `name` is built from the training batches (the exact curvature)."""
    return name in ("exact", "exact_block", "cg")


def build_operator(
    name: str,
    *,
    problem: CurvatureProblem,
    params: Params,
    damping: float = 0.1,
    relative_damping: bool = True,
    curvature: KfacCurvature | None = None,
    state: CurvatureState | None = None,
    batches: Sequence[Batch] | Callable[[], Iterable[Batch]] | None = None,
    exact_kind: str = "ggn",
    cg_tol: float = 1e-6,
    cg_max_iters: int = 200,
    rng: jax.Array | None = None,
) -> InverseOperator:
    """Builds operator `name`. kfac/ekfac need (curvature, state); those for which
    `needs_batches(name)` (exact, exact_block, cg) need `batches` — a sequence, or a function
    returning the pass's batches, called only by those operators (callers need not check)."""
    if name not in OPERATORS:
        raise InputError(
            f"unknown inverse operator {name!r}; one of {OPERATORS}", field="curvature.operator"
        )
    if name == "identity":
        return InverseOperator("identity", {p: 0.0 for p in problem.layers}, lambda v: v)
    if name in ("kfac", "ekfac"):
        if curvature is None or state is None:
            raise InputError(
                f"operator {name!r} needs a fitted curvature state", field="curvature.operator"
            )
        if name == "kfac":
            lam = block_damping(curvature.kfac_eigenvalues(state), damping, relative_damping)
            return InverseOperator("kfac", lam, lambda v: curvature.multiply_inverse(state, v, lam))
        lam = block_damping(ekfac_lib.ekfac_eigenvalues(state), damping, relative_damping)
        return InverseOperator(
            "ekfac", lam, lambda v: ekfac_lib.ekfac_multiply_inverse(curvature, state, v, lam)
        )
    if callable(batches):
        batches = list(batches())
    if not batches:
        raise InputError(f"operator {name!r} needs the training batches", field="data")
    selected, _ = layers_lib.split_params(params, problem.layers)
    slices = exact_lib.layer_slices(selected)
    if name == "cg":
        matvec = exact_lib.make_matvec(problem, exact_kind, params, batches)
        matvec_many = exact_lib.make_matvec_many(problem, exact_kind, params, batches)
        if relative_damping:
            means = exact_lib.hutchinson_block_means(
                matvec,
                selected,
                rng if rng is not None else jax.random.key(0),
                matvec_many=matvec_many,
            )
            lam = {p: damping * m for p, m in means.items()}
        else:
            lam = {p: damping for p in slices}
        lam_p = exact_lib.damping_vector(slices, lam)
        info: dict = {}

        def solve_many(vectors: list) -> list:
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *vectors)
            xs, got = exact_lib.conjugate_gradient_many(
                matvec_many, stacked, lam_p, tol=cg_tol, max_iters=cg_max_iters
            )
            info.update(got)
            return [jax.tree.map(lambda x, i=i: x[i], xs) for i in range(len(vectors))]

        return InverseOperator(
            "cg",
            lam,
            lambda v: exact_lib.conjugate_gradient(
                matvec, v, lam_p, tol=cg_tol, max_iters=cg_max_iters
            ),
            apply_many=solve_many,
            info=info,
        )
    h_pp = exact_lib.dense_curvature(problem, exact_kind, params, batches)
    if name == "exact_block":
        h_pp = exact_lib.block_diagonal(h_pp, slices)
    if relative_damping:
        lam = {p: damping * m for p, m in exact_lib.block_diag_means(h_pp, slices).items()}
    else:
        lam = {p: damping for p in slices}
    lam_p = exact_lib.damping_vector(slices, lam)
    return InverseOperator(name, lam, lambda v: exact_lib.dense_solve(h_pp, lam_p, v))
