"""Inverse-Hessian product operators v ↦ (H + λ)⁻¹ v for Lemma 1, selectable by name.

  identity     v itself (no curvature: α becomes a gradient alignment)
  kfac         kfac-jax's damped Kronecker inverse, (s·A⊗G + λ_b)⁻¹ per layer block
  ekfac        eigenvalue-corrected K-FAC (ekfac.py)
  exact        dense curvature (hessian / ggn / empirical) of all selected layers, solved densely
  exact_block  the same dense curvature with cross-layer blocks zeroed (what K-FAC approximates)
  cg           conjugate gradient with curvature-vector products (larger models), optionally
               preconditioned by the damped K-FAC or EK-FAC inverse (a fitted curvature state)
  cg_block     the same, one solve per layer block with cross-layer blocks dropped (exact_block
               for larger models)

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

OPERATORS = ("identity", "kfac", "ekfac", "exact", "exact_block", "cg", "cg_block")
CG_PRECONDITIONERS = ("none", "kfac", "ekfac")


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
    return name in ("exact", "exact_block", "cg", "cg_block")


def build_operator(
    name: str,
    *,
    problem: CurvatureProblem,
    params: Params,
    damping: float | None = None,
    relative_damping: bool | None = None,
    curvature: KfacCurvature | None = None,
    state: CurvatureState | None = None,
    batches: Sequence[Batch] | Callable[[], Iterable[Batch]] | None = None,
    exact_kind: str = "ggn",
    cg_tol: float | None = None,
    cg_max_iters: int | None = None,
    cg_preconditioner: str = "none",
    rng: jax.Array | None = None,
) -> InverseOperator:
    """Builds operator `name`. kfac/ekfac need (curvature, state); those for which
    `needs_batches(name)` (exact, exact_block, cg) need `batches` — a sequence, or a function
    returning the pass's batches, called only by those operators (callers need not check).
    cg_preconditioner (cg only): none | kfac | ekfac — the latter two need (curvature, state) and
    precondition with that inverse damped by the CG's own λ_b. damping and relative_damping (every
    operator but identity) and cg_tol / cg_max_iters (cg, cg_block) have no defaults here: they
    are cfg.curvature's and cfg.influence's fields, whose defaults live in configs/common.py."""
    if name not in OPERATORS:
        raise InputError(
            f"unknown inverse operator {name!r}; one of {OPERATORS}", field="influence.operator"
        )
    if name == "identity":
        return InverseOperator("identity", {p: 0.0 for p in problem.layers}, lambda v: v)
    missing = [
        k for k, v in (("damping", damping), ("relative_damping", relative_damping)) if v is None
    ]
    if name in ("cg", "cg_block"):
        missing += [k for k, v in (("cg_tol", cg_tol), ("cg_max_iters", cg_max_iters)) if v is None]
    if missing:
        raise TypeError(f"build_operator({name!r}) needs {', '.join(missing)} (configs/common.py)")
    if name in ("cg", "cg_block") and cg_preconditioner not in CG_PRECONDITIONERS:
        raise InputError(
            f"unknown CG preconditioner {cg_preconditioner!r}; one of {CG_PRECONDITIONERS}",
            field="influence.cg_preconditioner",
        )
    if name in ("kfac", "ekfac") or (name.startswith("cg") and cg_preconditioner != "none"):
        if curvature is None or state is None:
            raise InputError(
                f"operator {name!r} needs a fitted curvature state", field="influence.operator"
            )
    if name in ("kfac", "ekfac"):
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
    if name in ("cg", "cg_block"):
        return _cg_operator(
            name,
            problem,
            params,
            batches,
            exact_kind=exact_kind,
            damping=damping,
            relative_damping=relative_damping,
            tol=cg_tol,
            max_iters=cg_max_iters,
            precondition=_cg_preconditioner(cg_preconditioner, curvature, state),
            preconditioner=cg_preconditioner,
            rng=rng if rng is not None else jax.random.key(0),
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


def _cg_preconditioner(kind: str, curvature, state) -> Callable | None:
    """(v, λ) ↦ M v with M the damped K-FAC / EK-FAC inverse over all the state's layers (None:
    no preconditioner)."""
    if kind == "none":
        return None
    if kind == "kfac":
        return lambda v, lam: curvature.multiply_inverse(state, v, lam)
    ekfac_lib.ekfac_eigenvalues(state)  # InputError now if the correction was not fitted
    return lambda v, lam: ekfac_lib.ekfac_multiply_inverse(curvature, state, v, lam)


def _cg_operator(
    name: str,
    problem: CurvatureProblem,
    params: Params,
    batches: Sequence[Batch],
    *,
    exact_kind: str,
    damping: float,
    relative_damping: bool,
    tol: float,
    max_iters: int,
    precondition: Callable | None,
    preconditioner: str,
    rng: jax.Array,
) -> InverseOperator:
    """`cg`: (H + λ)⁻¹ over all selected layers at once (H with its cross-layer blocks).
    `cg_block`: one CG solve per layer block with the cross-layer blocks dropped — `exact_block`
    (what K-FAC / EK-FAC approximate) for models too large for a dense matrix; each block's GGN
    products differentiate that layer only.

    The preconditioner M (the damped K-FAC / EK-FAC inverse at the CG's own λ_b) is block-diagonal
    over layers: it matches `cg_block`'s operator block by block. For `cg` it ignores the
    cross-layer curvature (on a 2-layer test LM it made the full GGN's conditioning worse:
    tests/test_cg_preconditioning.py).
    """
    selected, _ = layers_lib.split_params(params, problem.layers)
    blocks = [problem.layers] if name == "cg" else [(p,) for p in problem.layers]
    lam: dict = {}
    infos: dict = {}
    solvers = []
    for index, block in enumerate(blocks):
        sub = dataclasses.replace(problem, layers=block)
        sub_selected = {p: selected[p] for p in block}
        matvec = exact_lib.make_matvec(sub, exact_kind, params, batches)
        matvec_many = exact_lib.make_matvec_many(sub, exact_kind, params, batches)
        if relative_damping:
            means = exact_lib.hutchinson_block_means(
                matvec, sub_selected, jax.random.fold_in(rng, index), matvec_many=matvec_many
            )
            block_lam = {p: damping * m for p, m in means.items()}
        else:
            block_lam = {p: damping for p in block}
        lam.update(block_lam)
        lam_p = exact_lib.damping_vector(exact_lib.layer_slices(sub_selected), block_lam)
        pre = pre_many = None
        if precondition is not None:  # jitted once per block, not per solve
            pre = _restricted_preconditioner(precondition, selected, block, block_lam)
            pre_many = jax.jit(jax.vmap(pre))
        solvers.append((block, matvec, matvec_many, lam_p, pre, pre_many))
        infos[",".join(block)] = {"preconditioner": preconditioner}

    def solve_many(vectors: list) -> list:
        out = [{} for _ in vectors]
        for block, _, matvec_many, lam_p, _, pre_many in solvers:
            stacked = jax.tree.map(
                lambda *xs: jnp.stack(xs), *[{p: v[p] for p in block} for v in vectors]
            )
            xs, got = exact_lib.conjugate_gradient_many(
                matvec_many,
                stacked,
                lam_p,
                tol=tol,
                max_iters=max_iters,
                precondition_many=pre_many,
                check_residual=True,
            )
            infos[",".join(block)].update(got)
            for i, o in enumerate(out):
                o.update(jax.tree.map(lambda x, i=i: x[i], xs))
        return out

    def solve(v: dict) -> dict:
        out = {}
        for block, matvec, _, lam_p, pre, _ in solvers:
            sub_v = {p: v[p] for p in block}
            out.update(
                exact_lib.conjugate_gradient(
                    matvec, sub_v, lam_p, tol=tol, max_iters=max_iters, precondition=pre
                )
            )
        return out

    # cg: the solve's info itself (iterations, residuals, ...); cg_block: one entry per layer
    info = infos[",".join(problem.layers)] if name == "cg" else {"blocks": infos}
    return InverseOperator(name, lam, solve, apply_many=solve_many, info=info)


def _restricted_preconditioner(precondition, selected: dict, block: tuple, block_lam: dict):
    """M restricted to `block`: the other layers' entries zero in, dropped out (M is block-diagonal
    over layers, so this is M's own diagonal block)."""
    zeros = {p: jax.tree.map(jnp.zeros_like, x) for p, x in selected.items() if p not in block}
    lam_all = {p: block_lam.get(p, jnp.float32(1.0)) for p in selected}

    def pre(v: dict) -> dict:
        out = precondition({**zeros, **v}, lam_all)
        return {p: out[p] for p in block}

    return pre
