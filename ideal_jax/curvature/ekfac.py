"""EK-FAC: eigenvalue correction of K-FAC in its Kronecker eigenbasis (kfac-jax has no such block).

With A = Q_A Λ_A Q_Aᵀ (input factor) and G = Q_G Λ_G Q_Gᵀ (output factor) from kfac-jax's cache, a
second pass fits, per layer and per eigen-direction pair (i, o),
    Λ*_io = (1/W) Σ_units ((Q_Aᵀ ∇W_unit Q_G)_io)²,
the exact diagonal of H in that basis (George et al. 2018; Grosse et al. 2023; Kronfluence).
With our
[D_in(+1), D_out] kernel layout this is the transpose of the usual "Q_Gᵀ ∇W Q_A". A "unit" is one
example (a batch row) or one whole batch; "units" use the data's targets for the
empirical Fisher and targets sampled from the model for the true Fisher (√w weighting), matching the
factor pass (kfac.py). W is the total token weight, so Λ* is the curvature of the
weighted-mean loss.

One pass per batch (implementation "captures", the default): a unit's gradient of a dense layer is
X̃_nᵀ Δ_n (captures.py), so its projection is (X̃_n Q_A)ᵀ (Δ_n Q_G): one forward and one backward
pass of the whole batch give every example's projected gradient, with no backward pass per example.
"per_row" (vmap of a whole-model gradient per row) is the reference it is tested against.

Inverse product (textbook — divide by the eigenvalues, untransposed bases; METHOD §1.4 defect 1):
    H⁻¹ V ≈ Q_A [ (Q_Aᵀ V Q_G) / (Λ* + λ) ] Q_Gᵀ.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.curvature import captures
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.kfac import CurvatureState, KfacCurvature, check_finite
from ideal_jax.curvature.problem import (
    Batch,
    Params,
    fisher_targets,
    flat_rows,
    row_losses,
)
from ideal_jax.utils import progress
from ideal_jax.utils.atomic import atomic_file
from ideal_jax.utils.errors import InputError

UNITS = ("example", "batch")
IMPLEMENTATIONS = ("captures", "per_row")


def pseudo_loss(curvature: KfacCurvature, selected: dict, rest: Params, batch: Batch, rng):
    """Σ_t c_t ℓ_t whose gradient is one Fisher 'unit' gradient (empirical or sampled targets)."""
    p = curvature.problem
    outputs = p.outputs_fn(layers_lib.merge_params(selected, rest), batch, frozenset())
    outputs_rc, targets, weights_r, _ = flat_rows(p, outputs, batch)
    if curvature.mode == "empirical":
        return jnp.sum(weights_r * row_losses(p, outputs_rc, targets))
    frozen_rc = jax.lax.stop_gradient(outputs_rc)
    if p.loss == "softmax_cross_entropy":
        sampled = jax.random.categorical(rng, frozen_rc, axis=-1)
    else:
        sampled = frozen_rc + jax.random.normal(rng, frozen_rc.shape, frozen_rc.dtype)
    return jnp.sum(jnp.sqrt(weights_r) * row_losses(p, outputs_rc, sampled))


def _project_squared(grads: dict, bases: Mapping[str, tuple]) -> dict:
    out = {}
    for path, (qa, _, qg, _) in bases.items():
        g_ao = layers_lib.layer_array(grads[path])
        out[path] = (qa.T @ g_ao @ qg) ** 2
    return out


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(at_most, 1)) + 1) if n % d == 0)


def _correction_step(curvature, unit, chunk_size, acc, weight, params, batch, bases, rng):
    selected, rest = layers_lib.split_params(params, curvature.problem.layers)
    grad_fn = jax.grad(pseudo_loss, argnums=1)
    weight = weight + jnp.sum(batch["weights"].astype(jnp.float32))
    if unit == "batch":
        sq = _project_squared(grad_fn(curvature, selected, rest, batch, rng), bases)
        return jax.tree.map(jnp.add, acc, sq), weight
    b = batch["weights"].shape[0]
    chunk = _largest_divisor(b, chunk_size)
    chunks = jax.tree.map(lambda x: x.reshape(b // chunk, chunk, *x.shape[1:]), dict(batch))
    keys = jax.random.split(rng, b).reshape(b // chunk, chunk)

    def one_example(row, key):
        row_batch = jax.tree.map(lambda x: x[None], row)
        return _project_squared(grad_fn(curvature, selected, rest, row_batch, key), bases)

    def body(carry, xs):
        rows, ks = xs
        sq = jax.vmap(one_example)(rows, ks)
        return jax.tree.map(lambda a, s: a + jnp.sum(s, axis=0), carry, sq), None

    acc, _ = jax.lax.scan(body, acc, (chunks, keys))
    return acc, weight


def _captured_correction_step(curvature, unit, chunk_size, acc, weight, params, batch, bases, rng):
    """One forward + one backward pass of the batch → Σ_units (Q_Aᵀ ∇W_unit Q_G)² per layer."""
    p = curvature.problem
    selected, rest = layers_lib.split_params(params, p.layers)
    weight = weight + jnp.sum(batch["weights"].astype(jnp.float32))

    def cotangent(outputs_rc):  # per-example units: example n draws with split(rng, B)[n]
        targets, coeff_r = fisher_targets(
            p, curvature.mode, outputs_rc, batch, rng, per_example=unit != "batch"
        )
        return captures.loss_cotangent(p, batch, coeff_r, targets)(outputs_rc)

    _, caught = captures.layer_captures(p, selected, rest, batch, cotangent)
    return _kept_correction_step(unit, acc, caught, bases), weight


def rotation_plan(t: int, i: int, o: int) -> tuple[bool, bool]:
    """(rotate the input rows, rotate the output-gradient rows) for one example's Q_Aᵀ X̃ᵀΔ Q_G.

    Each side independently takes the cheaper of two orders (FLOPs per example): the T input rows
    X̃ Q_A (2T·I²) or the formed I×O gradient Q_Aᵀ(X̃ᵀΔ) (2I²·O); the T output-gradient rows
    Δ Q_G (2T·O²) or (X̃ᵀΔ) Q_G (2I·O²). The product X̃ᵀΔ itself (2T·I·O) is paid either way.
    """
    return t <= o, t <= i


def squared_projections(x_bti: jax.Array, d_bto: jax.Array, qa: jax.Array, qg: jax.Array):
    """Σ_n (Q_Aᵀ X̃_nᵀ Δ_n Q_G)² [I, O] over the B examples of a batch (EK-FAC's Λ* numerator).

    Rows are rotated for the whole batch at once (one large matrix product per side, where
    `rotation_plan` says so); then one example at a time: a plain I×O matrix product, the
    remaining rotations, and the squares added to the running sum. Measured on XLA:CPU this is
    faster than one batched [chunk, I, O] product followed by a square-and-sum over the chunk
    (benchmarks/bench_score_passes.py), and its only temporary is one I×O matrix.
    """
    b, t, i = x_bti.shape
    o = d_bto.shape[-1]
    rows_a, rows_g = rotation_plan(t, i, o)
    if rows_a:
        x_bti = (x_bti.reshape(b * t, i) @ qa).reshape(b, t, i)
    if rows_g:
        d_bto = (d_bto.reshape(b * t, o) @ qg).reshape(b, t, o)

    def body(acc_io, x_d):
        x_ti, d_to = x_d
        g_io = x_ti.T @ d_to
        if not rows_a:
            g_io = qa.T @ g_io
        if not rows_g:
            g_io = g_io @ qg
        return acc_io + g_io * g_io, None

    acc_io, _ = jax.lax.scan(body, jnp.zeros((i, o), jnp.float32), (x_bti, d_bto))
    return acc_io


_STEPS = {"captures": _captured_correction_step, "per_row": _correction_step}


@functools.lru_cache(maxsize=32)
def _correction_jit(
    curvature: KfacCurvature, unit: str, chunk_size: int, implementation: str = "captures"
):
    """The correction step, jitted once per (curvature, unit, chunk size, implementation)."""
    step = _STEPS[implementation]
    return jax.jit(
        lambda a, w, p, b, bs, r: step(curvature, unit, chunk_size, a, w, p, b, bs, r),
        donate_argnums=(0, 1),
    )


def fit_eigen_correction(
    curvature: KfacCurvature,
    state: CurvatureState,
    params: Params,
    batches: Iterable[Batch],
    rng: jax.Array,
    *,
    unit: str = "example",
    chunk_size: int = 8,
    implementation: str = "captures",
) -> CurvatureState:
    """Second pass over `batches`: returns `state` with Λ* (global averages) filled in.

    `chunk_size`: examples per vmapped chunk of the "per_row" reference; the "captures" path takes
    the examples of a batch one at a time (`squared_projections`)."""
    if unit not in UNITS:
        raise InputError(f"unknown unit {unit!r}; one of {UNITS}", field="curvature.correction")
    if implementation not in IMPLEMENTATIONS:
        raise InputError(
            f"unknown EK-FAC implementation {implementation!r}; one of {IMPLEMENTATIONS}"
        )
    if curvature.mode not in ("empirical", "fisher"):
        raise InputError("EK-FAC needs mode 'empirical' or 'fisher'", field="curvature.estimator")
    bases = curvature.eigenbases(state)
    step = _correction_jit(curvature, unit, chunk_size, implementation)
    acc = _zero_correction(bases)
    weight = jnp.zeros((), jnp.float32)
    for i, batch in enumerate(progress.bar(batches, "eigenvalue correction")):
        acc, weight = step(acc, weight, params, batch, bases, jax.random.fold_in(rng, i))
    return _finish_correction(state, acc, weight)


def _zero_correction(bases: dict) -> dict:
    return {
        path: jnp.zeros((qa.shape[0], qg.shape[0]), jnp.float32)
        for path, (qa, _, qg, _) in bases.items()
    }


def _finish_correction(state: CurvatureState, acc: dict, weight) -> CurvatureState:
    """Λ* = Σ / W into the state; InputError on a pass without response tokens."""
    if float(weight) <= 0:
        raise InputError("eigenvalue-correction pass saw no response tokens", field="weights")
    correction = jax.tree.map(lambda a: a / weight, acc)
    state = state.replace(correction=correction, correction_weight=weight)
    check_finite(state)
    return state


def _kept_correction_step(unit: str, acc: dict, caught: dict, bases: dict) -> dict:
    """acc + Σ_units (Q_Aᵀ ∇W_unit Q_G)² per layer from one batch's captures (both passes)."""
    acc = dict(acc)
    for path, (x_bti, d_bto) in caught.items():
        qa, _, qg, _ = bases[path]
        if unit == "batch":
            g_io = jnp.einsum("BTI,BTO->IO", x_bti, d_bto)
            acc[path] = acc[path] + (qa.T @ g_io @ qg) ** 2
        else:
            acc[path] = acc[path] + squared_projections(x_bti, d_bto, qa, qg)
    return acc


@functools.lru_cache(maxsize=8)
def _kept_correction_jit(unit: str):
    return jax.jit(functools.partial(_kept_correction_step, unit), donate_argnums=(0,))


def correction_from_captures(
    curvature: KfacCurvature, state: CurvatureState, kept, *, unit: str = "example"
) -> CurvatureState:
    """`fit_eigen_correction` from the captures the factor pass kept
    (kfac.accumulate_factors_keeping): the same Λ* = (1/W) Σ_units (Q_Aᵀ ∇W_unit Q_G)², with the
    units' gradients those of the factor pass — the same targets (data or sampled) that A and G
    were formed from — and no second forward or backward pass of the model."""
    if unit not in UNITS:
        raise InputError(f"unknown unit {unit!r}; one of {UNITS}", field="curvature.correction")
    bases = curvature.eigenbases(state)
    step = _kept_correction_jit(unit)
    acc = _zero_correction(bases)
    weight = jnp.zeros((), jnp.float32)
    for caught, w in progress.bar(kept.batches, "eigenvalue correction (kept captures)"):
        acc = step(acc, caught, bases)
        weight = weight + w
    return _finish_correction(state, acc, weight)


def ekfac_eigenvalues(state: CurvatureState) -> dict[str, jax.Array]:
    """path → Λ* [D_in(+1), D_out] (after `fit_eigen_correction`)."""
    if state.correction is None:
        raise InputError(
            "EK-FAC state has no eigenvalue correction; run fit_eigen_correction",
            field="influence.operator",
        )
    return dict(state.correction)


@jax.jit
def _ekfac_inverse(bases: dict, correction: dict, vector: dict, damping: dict) -> dict:
    out = {}
    for path, (qa, _, qg, _) in bases.items():
        v_ao = layers_lib.layer_array(vector[path])
        rotated = qa.T @ v_ao @ qg
        out[path] = layers_lib.layer_from_array(
            qa @ (rotated / (correction[path] + damping[path])) @ qg.T, vector[path]
        )
    return out


def ekfac_multiply_inverse(
    curvature: KfacCurvature, state: CurvatureState, vector: dict, damping: Mapping[str, jax.Array]
) -> dict:
    """Q_A [(Q_Aᵀ V Q_G) / (Λ* + λ_b)] Q_Gᵀ for every selected layer (Lemma 1's H⁻¹ v)."""
    return _ekfac_inverse(
        curvature.eigenbases(state), ekfac_eigenvalues(state), dict(vector), dict(damping)
    )


# -- saving and reloading -----------------------------------------------------------------------
def state_to_arrays(state: CurvatureState) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays keyed leaf_i, metadata) — a flat, framework-free form of `state`."""
    leaves = jax.tree_util.tree_leaves(state)
    meta = {
        "layers": list(state.layers),
        "block_paths": list(state.block_paths),
        "mode": state.mode,
        "has_correction": state.correction is not None,
        "shapes": [list(np.shape(x)) for x in leaves],
    }
    return {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}, meta


def state_from_arrays(
    arrays: Mapping[str, np.ndarray], meta: dict, template: CurvatureState, source: str = "<memory>"
) -> CurvatureState:
    """Rebuilds a state shaped like `template` (from `init` on the current model), checking it."""
    if (
        meta["layers"] != list(template.layers)
        or meta["mode"] != template.mode
        or meta.get("block_paths", meta["layers"]) != list(template.block_paths)
    ):
        raise InputError(
            f"curvature state is for layers {meta['layers'][:4]}… mode "
            f"{meta['mode']!r}, not this model's {list(template.layers)[:4]}… "
            f"mode {template.mode!r}",
            path=source,
            field="layers",
        )
    if meta["has_correction"] and template.correction is None:
        template = template.replace(
            correction={p: jnp.zeros(s) for p, s in _correction_shapes(template).items()},
            correction_weight=jnp.zeros(()),
        )
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(arrays):
        raise InputError("curvature state has a different structure", path=source)
    new = []
    for i, ref in enumerate(leaves):
        got = arrays[f"leaf_{i}"]
        if tuple(got.shape) != tuple(np.shape(ref)):
            raise InputError(
                f"curvature array {i} has shape {got.shape}, the model needs {np.shape(ref)}",
                path=source,
                field=f"leaf_{i}",
            )
        new.append(jnp.asarray(got, dtype=ref.dtype))
    state = jax.tree_util.tree_unflatten(treedef, new)
    check_finite(state)
    return state


def _correction_shapes(state: CurvatureState) -> dict[str, tuple[int, int]]:
    shapes = {}
    for path, bstate in zip(state.block_paths, state.kfac.blocks_states):
        shapes[path] = (bstate.factors[0].value.shape[0], bstate.factors[1].value.shape[0])
    return shapes


def save_state(path: str, state: CurvatureState) -> None:
    """Writes `state` to `path` (.npz with a JSON metadata entry), atomically."""
    arrays, meta = state_to_arrays(state)
    with atomic_file(path, "wb") as f:
        np.savez(f, __meta__=np.asarray(json.dumps(meta)), **arrays)


def load_state(path: str, template: CurvatureState) -> CurvatureState:
    """Reads a state written by `save_state`; InputError if it does not fit `template`'s model."""
    with np.load(path) as data:
        meta = json.loads(str(data["__meta__"]))
        arrays = {k: data[k] for k in data.files if k != "__meta__"}
    return state_from_arrays(arrays, meta, template, source=path)
