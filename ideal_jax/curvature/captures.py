"""Inputs and output gradients of every tagged dense layer, for a whole batch, in ONE backward pass.

A dense layer y_t = W x_t (+ b) has per-example gradient ∇W_n = Σ_{t∈n} x̃_t δ_tᵀ = X̃_nᵀ Δ_n,
where x̃_t = (x_t, 1) (the 1 for a bias), δ_t = ∂L/∂y_t, and t runs over the tokens of example n.
Rows of a batch are independent examples (padded, one example per row), so one ordinary backward
pass of the batch's loss gives every δ_t, and with the captured x_t every example's gradient — or
any projection of it — without a backward pass per example.

The capture runs the problem's forward once under jax.vjp with zero probes added to the tagged
layers' outputs (the model's capture mode, `ProbeCapture`; the inputs come out as auxiliary
output), and pulls a cotangent of the model outputs back to every probe. Problems without that
mode use kfac-jax's own tracer (`layer_tags_vjp`) over the same `register_dense` tags the factor
pass uses. The cotangent is ∂(pseudo-loss)/∂outputs, chosen by the caller
(empirical targets, sampled targets, plain loss), so one capture serves the EK-FAC correction, the
per-example scores and the domain gradients.

Shapes: B examples (batch rows), T rows per example in the tag (tokens; 1 for a plain MLP batch),
I layer input width (+1 with a bias), O layer output width, C model outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import kfac_jax

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.problem import (
    Batch,
    CurvatureProblem,
    Params,
    flat_rows,
    loss_rows,
    row_losses,
)
from ideal_jax.utils.errors import InputError


def _marker_loss(problem: CurvatureProblem, selected: dict, rest: Params, batch: Batch):
    """The tagged forward with a loss tag on the raw outputs [R, C] (the tag marks where the
    cotangent enters; its own weights are never used)."""
    outputs = problem.outputs_fn(
        layers_lib.merge_params(selected, rest), batch, frozenset(problem.layers)
    )
    outputs_rc, targets, _, _ = flat_rows(problem, outputs, batch)
    if problem.loss == "softmax_cross_entropy":
        kfac_jax.register_softmax_cross_entropy_loss(outputs_rc, targets)
    else:
        kfac_jax.register_squared_error_loss(outputs_rc, targets)
    return jnp.sum(outputs_rc)


@functools.lru_cache(maxsize=32)
def _tracer(problem: CurvatureProblem):
    """kfac-jax's (layer-tag vjp, jaxpr extractor) for `problem`, built once per process."""
    # Batches of another shape or structure (e.g. with or without domain ids) trace a different
    # jaxpr; tags are matched to layers on each trace, so that is not an error here.
    return kfac_jax.layer_tags_vjp(
        functools.partial(_marker_loss, problem),
        params_index=0,
        auto_register_tags=False,
        raise_error_on_diff_jaxpr=False,
    )


def layer_captures(
    problem: CurvatureProblem,
    selected: dict,
    rest: Params,
    batch: Batch,
    cotangent_fn: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """(outputs [R, C], {path: (X̃ [B, T, I], Δ [B, T, O])}) for every selected layer.

    `cotangent_fn(outputs_rc)` returns ∂(loss)/∂outputs [R, C] for the loss whose per-example
    gradients are wanted; it is treated as a constant (no second-order terms).
    """
    if problem.probe_capture:
        outputs_rc, rows = _probe_rows(problem, selected, rest, batch, cotangent_fn)
    else:
        outputs_rc, rows = _tracer_rows(problem, selected, rest, batch, cotangent_fn)
    b = batch["weights"].shape[0]
    out = {}
    for path, (x_ri, d_ro) in rows.items():
        x_ri = x_ri.astype(jnp.float32).reshape(-1, x_ri.shape[-1])
        d_ro = d_ro.astype(jnp.float32).reshape(-1, d_ro.shape[-1])
        if x_ri.shape[0] % b:
            raise InputError(
                f"layer {path!r} sees {x_ri.shape[0]} rows for a batch of {b} examples; "
                "per-example captures need rows grouped by example",
                field="curvature.layers",
            )
        if selected[path].get("bias") is not None:
            x_ri = jnp.concatenate([x_ri, jnp.ones_like(x_ri[:, :1])], axis=1)
        out[path] = (x_ri.reshape(b, -1, x_ri.shape[-1]), d_ro.reshape(b, -1, d_ro.shape[-1]))
    missing = set(problem.layers) - set(out)
    if missing:
        raise InputError(
            f"layers {sorted(missing)} are not tagged by the model (kfac_jax.register_dense)",
            field="curvature.layers",
        )
    return outputs_rc, out


def _probe_rows(problem, selected, rest, batch, cotangent_fn):
    """The model's own capture mode (model/transformer.py ProbeCapture): ONE jax.vjp of the forward
    with respect to zero probes added to the tagged outputs; the inputs are its auxiliary output.

    kfac-jax's tracer (`_tracer_rows`) evaluates the forward once to read the tag inputs and again
    inside its vjp, and XLA merges only part of the two (about 23% more FLOPs than a forward and
    an activation-only backward at the bench's "large" size, docs/results/issue28_*.md).
    """
    from ideal_jax.model.transformer import ProbeCapture

    params = layers_lib.merge_params(selected, rest)
    tagged = frozenset(problem.layers)

    def run(probes):
        capture = ProbeCapture(probes)
        outputs = problem.outputs_fn(params, batch, tagged, capture=capture)
        return flat_rows(problem, outputs, batch)[0], dict(capture.inputs)

    def shapes():
        capture = ProbeCapture(None)
        problem.outputs_fn(params, batch, tagged, capture=capture)
        return dict(capture.shapes)

    zeros = {p: jnp.zeros(sd.shape, sd.dtype) for p, sd in jax.eval_shape(shapes).items()}
    outputs_rc, vjp, inputs = jax.vjp(run, zeros, has_aux=True)
    cot_rc = jax.lax.stop_gradient(cotangent_fn(jax.lax.stop_gradient(outputs_rc)))
    (deltas,) = vjp(cot_rc.astype(outputs_rc.dtype))
    return outputs_rc, {p: (inputs[p], deltas[p]) for p in inputs if p in selected}


def _tracer_rows(problem, selected, rest, batch, cotangent_fn):
    """kfac-jax's layer-tag vjp (any problem whose outputs_fn tags with register_dense)."""
    vjp_fn, extractor = _tracer(problem)
    func_args = (selected, rest, batch)
    losses, vjp = vjp_fn(func_args)
    outputs_rc = losses[0].parameter_dependants[0]
    cot_rc = jax.lax.stop_gradient(cotangent_fn(jax.lax.stop_gradient(outputs_rc)))
    layer_data = vjp(((cot_rc.astype(outputs_rc.dtype),),))
    processed = extractor(func_args)
    leaf_paths = [
        str(key_path[0].key) for key_path, _ in jax.tree_util.tree_leaves_with_path(selected)
    ]
    rows = {}
    for indices, data in zip(processed.layer_indices, layer_data):
        rows[leaf_paths[indices[0]]] = (data.primals.inputs[0], data.tangents.outputs[0])
    return outputs_rc, rows


def loss_cotangent(problem: CurvatureProblem, batch: Batch, coeff_r: jax.Array, targets=None):
    """outputs_rc ↦ ∂(Σ_r c_r ℓ_r(outputs, targets))/∂outputs (data targets by default)."""

    def cotangent(outputs_rc):
        t = loss_rows(problem, batch)[0] if targets is None else targets
        return jax.grad(lambda o: jnp.sum(coeff_r * row_losses(problem, o, t)))(outputs_rc)

    return cotangent
