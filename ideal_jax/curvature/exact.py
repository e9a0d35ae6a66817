"""Exact references for H (Lemma 1) restricted to the selected layers: dense matrices and CG.

All curvatures are of the weighted-mean training loss L = Σ w ℓ / W (same as kfac.py):
  "hessian"    ∇²L,                     via jvp-of-grad (Hessian-vector products)
  "ggn"        (1/W) Σ_b J_bᵀ H_out J_b (Gauss-Newton; = true Fisher for softmax CE), via jvp + vjp
  "empirical"  (1/W) Σ_rows u_r u_rᵀ,   u_r = ∇ Σ_{t∈row} w_t ℓ_t (one example per batch row)
Dense matrices are [P, P] over the flattened selected parameters (small models only, P ≲ 10⁴);
`conjugate_gradient` solves (H + Λ) x = v with the same products for larger ones, optionally
preconditioned by a damped K-FAC / EK-FAC inverse (operators.py, `cg`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.problem import (
    Batch,
    CurvatureProblem,
    Params,
    flat_rows,
    loss_outputs,
    loss_rows,
    row_losses,
)
from ideal_jax.utils.errors import InputError

KINDS = ("hessian", "ggn", "empirical")


def layer_slices(selected: Mapping[str, dict]) -> dict[str, slice]:
    """path → slice of the layer's parameters in `ravel_pytree(selected)` (sorted-key order)."""
    out, start = {}, 0
    for path in sorted(selected):
        size = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(selected[path]))
        out[path] = slice(start, start + size)
        start += size
    return out


def _loss_sum(problem: CurvatureProblem, selected: dict, rest: Params, batch: Batch):
    outputs = problem.outputs_fn(layers_lib.merge_params(selected, rest), batch, frozenset())
    outputs_rc, targets, weights_r, _ = flat_rows(problem, outputs, batch)
    return jnp.sum(weights_r * row_losses(problem, outputs_rc, targets))


def _output_hessian_product(problem: CurvatureProblem, outputs_rc, weights_r, u_rc):
    """w_r ∇²_y ℓ_r u_r for every row (softmax CE: diag(p) − ppᵀ; squared error: I)."""
    if problem.loss == "squared_error":
        return weights_r[:, None] * u_rc
    p_rc = jax.nn.softmax(outputs_rc, axis=-1)
    return weights_r[:, None] * (p_rc * u_rc - p_rc * jnp.sum(p_rc * u_rc, -1, keepdims=True))


def batch_matvec(
    problem: CurvatureProblem, kind: str, selected: dict, rest: Params, batch: Batch, v: dict
) -> dict:
    """Σ-over-batch curvature-vector product (not yet divided by W)."""
    if kind == "hessian":
        grad = jax.grad(lambda s: _loss_sum(problem, s, rest, batch))
        return jax.jvp(grad, (selected,), (v,))[1]
    if kind == "ggn":

        def outputs_of(s):
            out = problem.outputs_fn(layers_lib.merge_params(s, rest), batch, frozenset())
            return loss_outputs(problem, out, batch)

        outputs_rc, jv_rc = jax.jvp(outputs_of, (selected,), (v,))
        _, weights_r, _ = loss_rows(problem, batch)
        hjv_rc = _output_hessian_product(problem, outputs_rc, weights_r, jv_rc)
        return jax.vjp(outputs_of, selected)[1](hjv_rc)[0]
    if kind == "empirical":
        per_row = per_row_gradients(problem, selected, rest, batch)
        dots_n = sum(
            jnp.sum(g * x[None], axis=tuple(range(1, g.ndim)))
            for g, x in zip(jax.tree.leaves(per_row), jax.tree.leaves(v))
        )
        return jax.tree.map(lambda g: jnp.tensordot(dots_n, g, axes=1), per_row)
    raise InputError(f"unknown curvature kind {kind!r}; one of {KINDS}", field="exact_kind")


def per_row_gradients(problem: CurvatureProblem, selected: dict, rest: Params, batch: Batch):
    """∇ Σ_{t∈row} w_t ℓ_t for every batch row, stacked on a leading [B] axis."""

    def one(row):
        row_batch = jax.tree.map(lambda x: x[None], row)
        return jax.grad(lambda s: _loss_sum(problem, s, rest, row_batch))(selected)

    return jax.vmap(one)(dict(batch))


def total_weight(batches: Sequence[Batch]) -> float:
    """W = Σ w over `batches`; InputError if there are no response tokens."""
    w = float(sum(float(jnp.sum(b["weights"])) for b in batches))
    if w <= 0:
        raise InputError("no response tokens (all weights are 0)", field="weights")
    return w


def make_matvec(
    problem: CurvatureProblem, kind: str, params: Params, batches: Sequence[Batch]
) -> Callable[[dict], dict]:
    """v ↦ H v for H of the weighted-mean loss over `batches` (one jitted product per batch)."""
    selected, rest = layers_lib.split_params(params, problem.layers)
    w = total_weight(batches)
    # The parameters are arguments, not constants baked into the program (XLA would fold them).
    step = jax.jit(lambda s, r, b, v: batch_matvec(problem, kind, s, r, b, v))

    def matvec(v: dict) -> dict:
        acc = jax.tree.map(jnp.zeros_like, v)
        for b in batches:
            acc = jax.tree.map(jnp.add, acc, step(selected, rest, b, v))
        return jax.tree.map(lambda x: x / w, acc)

    return matvec


def _ggn_many_step(problem: CurvatureProblem, selected, rest, batch: Batch, vs: dict) -> dict:
    """Σ-over-batch GGN products for R stacked vectors (leading [R] axis): the model's forward
    pass once (linearized), then one tangent and one transposed pass per vector."""

    def outputs_of(s):
        out = problem.outputs_fn(layers_lib.merge_params(s, rest), batch, frozenset())
        return loss_outputs(problem, out, batch)

    outputs_rc, jvp = jax.linearize(outputs_of, selected)
    vjp = jax.linear_transpose(jvp, selected)
    _, weights_r, _ = loss_rows(problem, batch)

    def one(v):
        hjv_rc = _output_hessian_product(problem, outputs_rc, weights_r, jvp(v))
        return vjp(hjv_rc)[0]

    return jax.vmap(one)(vs)


def make_matvec_many(
    problem: CurvatureProblem, kind: str, params: Params, batches: Sequence[Batch]
) -> Callable[[dict], dict]:
    """V ↦ H V for R vectors stacked on a leading axis (`make_matvec`'s H). For the GGN each batch
    runs the model forward once for all R vectors instead of twice per vector."""
    if kind != "ggn":
        single = make_matvec(problem, kind, params, batches)
        return lambda vs: jax.tree.map(
            lambda *xs: jnp.stack(xs),
            *[single(jax.tree.map(lambda x, i=i: x[i], vs)) for i in range(_rows(vs))],
        )
    selected, rest = layers_lib.split_params(params, problem.layers)
    w = total_weight(batches)
    step = jax.jit(lambda s, r, b, vs: _ggn_many_step(problem, s, r, b, vs))

    def matvec(vs: dict) -> dict:
        acc = jax.tree.map(jnp.zeros_like, vs)
        for b in batches:
            acc = jax.tree.map(jnp.add, acc, step(selected, rest, b, vs))
        return jax.tree.map(lambda x: x / w, acc)

    return matvec


def _rows(vs: dict) -> int:
    return int(jax.tree.leaves(vs)[0].shape[0])


def dense_curvature(
    problem: CurvatureProblem, kind: str, params: Params, batches: Sequence[Batch], chunk: int = 256
) -> jax.Array:
    """The dense [P, P] curvature of the selected layers (P = their parameter count)."""
    selected, rest = layers_lib.split_params(params, problem.layers)
    flat, unravel = ravel_pytree(selected)
    p = flat.shape[0]
    if p > 20_000:
        raise InputError(
            f"dense curvature over {p} parameters is too large; use 'cg'",
            field="influence.operator",
        )
    w = total_weight(batches)

    @jax.jit
    def columns(batch, eye_kp):
        mv = lambda e: ravel_pytree(batch_matvec(problem, kind, selected, rest, batch, unravel(e)))[
            0
        ]
        return jax.vmap(mv)(eye_kp)

    eye = jnp.eye(p, dtype=jnp.float32)
    h_pp = jnp.zeros((p, p), jnp.float32)
    for b in batches:
        h_pp = h_pp + jnp.concatenate([columns(b, eye[i : i + chunk]) for i in range(0, p, chunk)])
    h_pp = h_pp / w
    return 0.5 * (h_pp + h_pp.T)


def block_diagonal(h_pp: jax.Array, slices: Mapping[str, slice]) -> jax.Array:
    """`h_pp` with every cross-layer block set to zero."""
    mask = np.zeros(h_pp.shape, bool)
    for s in slices.values():
        mask[s, s] = True
    return jnp.where(mask, h_pp, 0.0)


def damping_vector(slices: Mapping[str, slice], damping: Mapping[str, jax.Array]) -> jax.Array:
    """Per-parameter λ (λ_b on every coordinate of block b)."""
    p = max(s.stop for s in slices.values())
    out = jnp.zeros((p,), jnp.float32)
    for path, s in slices.items():
        out = out.at[s].set(damping[path])
    return out


def block_diag_means(h_pp: jax.Array, slices: Mapping[str, slice]) -> dict[str, jax.Array]:
    """path → mean of the diagonal of block b (= its mean eigenvalue), for relative damping."""
    diag = jnp.diag(h_pp)
    return {path: jnp.mean(diag[s]) for path, s in slices.items()}


def dense_solve(h_pp: jax.Array, lam_p: jax.Array, v: dict) -> dict:
    """(H + diag λ)⁻¹ v with v a selected-params pytree."""
    flat, unravel = ravel_pytree(v)
    return unravel(jnp.linalg.solve(h_pp + jnp.diag(lam_p), flat))


def conjugate_gradient(
    matvec: Callable[[dict], dict],
    v: dict,
    lam_p: jax.Array,
    *,
    tol: float = 1e-6,
    max_iters: int = 200,
    precondition: Callable[[dict], dict] | None = None,
) -> dict:
    """Solves (H + diag λ) x = v by (preconditioned) CG with curvature-vector products: the
    single-vector form of `conjugate_gradient_many`."""
    stacked = jax.tree.map(lambda x: x[None], v)
    many = lambda vs: jax.tree.map(lambda x: x[None], matvec(jax.tree.map(lambda x: x[0], vs)))
    pre = None
    if precondition is not None:
        pre = lambda vs: jax.tree.map(
            lambda x: x[None], precondition(jax.tree.map(lambda x: x[0], vs))
        )
    xs, _ = conjugate_gradient_many(
        many, stacked, lam_p, tol=tol, max_iters=max_iters, precondition_many=pre
    )
    return jax.tree.map(lambda x: x[0], xs)


def conjugate_gradient_many(
    matvec_many: Callable[[dict], dict],
    vs: dict,
    lam_p: jax.Array,
    *,
    tol: float = 1e-6,
    max_iters: int = 200,
    precondition_many: Callable[[dict], dict] | None = None,
    check_residual: bool = False,
) -> tuple[dict, dict]:
    """Solves (H + diag λ) x_r = v_r for R stacked vectors at once (one batched product per step;
    a converged vector stops moving).

    precondition_many: M ≈ (H + diag λ)⁻¹ applied to R stacked vectors (symmetric positive
    definite, e.g. the damped EK-FAC inverse): preconditioned CG, which needs about √κ(M(H+λ))
    steps instead of √κ(H+λ) — on an LM, where λ is a small fraction of the mean eigenvalue and
    the spectrum spans many decades, the difference between converging and not. Convergence is
    judged on the unpreconditioned residual ‖r‖ ≤ tol·‖v‖ either way.
    check_residual: one more product, to report the true residual ‖v − (H + λ)x‖/‖v‖ beside the
    recursively updated one (in float32 they drift apart over many steps).

    Returns (x stacked like `vs`, info: iterations, relative residual per vector, ...).
    """
    r_count = _rows(vs)
    flatten = jax.vmap(lambda v: ravel_pytree(v)[0])
    unravel = ravel_pytree(jax.tree.map(lambda x: x[0], vs))[1]
    stack = lambda flat: jax.vmap(unravel)(flat)
    # Where the [R, P] vectors live between products: on the host when the backend is XLA:CPU
    # in one process (numpy; the only device programs are the per-batch products), else on the
    # device. On an 8-device CPU mesh the loop's many small sharded programs (dots, updates,
    # each an all-reduce) interleaved with the products' programs and deadlocked XLA:CPU's
    # collective rendezvous (6 of 8 device threads arrived; tests/test_cg_mesh.py).
    xp = np if vectors_on_host(vs) else jnp
    to_xp = np.asarray if xp is np else (lambda a: a)
    flat_rp = to_xp(flatten(vs))
    lam_rp = to_xp(lam_p)[None]
    op = lambda x_rp: to_xp(flatten(matvec_many(stack(x_rp)))) + lam_rp * x_rp
    pre = (
        (lambda r_rp: r_rp)
        if precondition_many is None
        else (lambda r_rp: to_xp(flatten(precondition_many(stack(r_rp)))))
    )
    norm_r = xp.linalg.norm(flat_rp, axis=1)
    x = xp.zeros_like(flat_rp)
    r = flat_rp
    z = pre(r)
    d, rz, rr = z, xp.sum(r * z, axis=1), xp.sum(r * r, axis=1)
    target = (tol * norm_r) ** 2
    iterations = 0
    for iterations in range(1, max_iters + 1):
        active = rr > target
        if not bool(xp.any(active)):
            iterations -= 1
            break
        hd = op(d)
        dhd = xp.sum(d * hd, axis=1)
        step = xp.where(active, rz / xp.where(active, dhd, 1.0), 0.0).astype(flat_rp.dtype)
        x, r = x + step[:, None] * d, r - step[:, None] * hd
        z = pre(r)
        rz_new = xp.sum(r * z, axis=1)
        beta = xp.where(active, rz_new / xp.where(active, rz, 1.0), 0.0).astype(flat_rp.dtype)
        d = xp.where(active[:, None], z + beta[:, None] * d, d)
        rz = xp.where(active, rz_new, rz)
        rr = xp.where(active, xp.sum(r * r, axis=1), rr)
    scale = xp.maximum(norm_r, 1e-30)
    info = {
        "iterations": int(iterations),
        "relative_residual": np.asarray(xp.sqrt(rr) / scale).tolist(),
        "rows": r_count,
        "preconditioned": precondition_many is not None,
    }
    if check_residual:
        true_r = np.asarray(flat_rp - op(x), np.float64)
        info["true_relative_residual"] = (
            np.linalg.norm(true_r, axis=1) / np.asarray(scale, np.float64)
        ).tolist()
    return stack(jnp.asarray(x)), info


def vectors_on_host(vs: dict) -> bool:
    """True when `vs` live on CPU devices of this one process (the CG vectors then stay on the
    host between products: `conjugate_gradient_many`)."""
    if jax.process_count() > 1:
        return False
    leaves = [x for x in jax.tree.leaves(vs) if isinstance(x, jax.Array)]
    return all(d.platform == "cpu" for x in leaves for d in x.devices())


def hutchinson_block_means(
    matvec: Callable[[dict], dict],
    like: dict,
    rng: jax.Array,
    num_probes: int = 8,
    matvec_many: Callable[[dict], dict] | None = None,
) -> dict[str, jax.Array]:
    """Estimated mean diagonal (trace / dim) of each layer block, for relative damping with CG
    (`matvec_many`, if given: all probes in one batched product)."""
    flat, unravel = ravel_pytree(like)
    slices = layer_slices(like)
    probes = [
        jax.random.rademacher(jax.random.fold_in(rng, i), flat.shape, jnp.float32)
        for i in range(num_probes)
    ]
    # the products' sums on the host on XLA:CPU (see conjugate_gradient_many), else on device
    to_xp = np.asarray if vectors_on_host(like) else (lambda a: a)
    if matvec_many is not None:
        products = matvec_many(jax.vmap(unravel)(jnp.stack(probes)))
        hz = to_xp(jax.vmap(lambda v: ravel_pytree(v)[0])(products))
        acc = sum(to_xp(z) * hz[i] for i, z in enumerate(probes))
    else:
        acc = 0.0
        for z in probes:
            acc = acc + to_xp(z) * to_xp(ravel_pytree(matvec(unravel(z)))[0])
    return {p: jnp.asarray(acc[s].mean() / num_probes) for p, s in slices.items()}
