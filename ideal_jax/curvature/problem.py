"""The model and loss the curvature and influence code work on, and the loss rows of a batch.

A `CurvatureProblem` says how to run the model with tagged layers and which loss to register; the
training loss is the token-weighted mean L = Σ_t w_t ℓ_t / Σ_t w_t (w = 1 on response tokens).
`flat_rows` / `loss_rows` give the rows that loss is made of: every token row of a [B, T] batch, or
the K rows per example named by batch[LOSS_POSITIONS] (`add_loss_positions` adds them host-side).
The K-FAC estimator over such a problem is ideal_jax/curvature/kfac.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ideal_jax.data import batching
from ideal_jax.utils.errors import InputError

Batch = Mapping[str, jax.Array]
Params = dict
OutputsFn = Callable[[Params, Batch, frozenset], jax.Array]
LOSSES = ("softmax_cross_entropy", "squared_error")


@dataclasses.dataclass(frozen=True)
class CurvatureProblem:
    """A model and its loss as the curvature and influence code see them.

    outputs_fn(params, batch, tagged_layers) -> outputs [..., C]: runs the model and wraps each
      layer whose path is in `tagged_layers` in `kfac_jax.register_dense`.
    loss: "softmax_cross_entropy" (batch["targets"] int [...]) or "squared_error" (½‖y − t‖²,
      batch["targets"] float [..., C]). batch["weights"] [...] holds 0/1 token weights.
    token_mask_key: batch field whose non-zero entries are real (non-padding) rows.
    outputs_at_loss_positions: outputs_fn itself returns [B, K, C] at batch[LOSS_POSITIONS] when the
      batch has them (the LM computes its head there only); otherwise outputs are [B, T, C] and
      the loss rows are gathered from them.
    """

    outputs_fn: OutputsFn
    layers: tuple[str, ...]
    loss: str = "softmax_cross_entropy"
    token_mask_key: str | None = "segment_ids"
    outputs_at_loss_positions: bool = False
    # outputs_fn(params, batch, tagged, capture=ProbeCapture) is supported (model/transformer.py):
    # curvature/captures.py then captures through the forward's own vjp, not kfac-jax's tracer.
    probe_capture: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise InputError(
                f"unknown loss {self.loss!r}; one of {LOSSES}", field="CurvatureProblem.loss"
            )


# Optional batch field [B, T, D]: the hidden state entering decoder layer `start_layer` of an
# lm_problem (`with_prefix_hidden`). The layers below the lowest curvature layer do not depend on
# the parameters any pass differentiates, so their output is computed once per batch and every
# pass (factors, correction, gradients, GGN products) runs only the layers from there up.
PREFIX_HIDDEN = "prefix_hidden"


@functools.lru_cache(maxsize=32)
def lm_problem(model_cfg: Any, layers: tuple[str, ...], start_layer: int = 0) -> CurvatureProblem:
    """The decoder LM of `ideal_jax.model.transformer` with response-token cross-entropy.

    start_layer > 0: batches carrying PREFIX_HIDDEN (the hidden state entering that decoder layer)
    run from there; batches without it run the whole model. Every layer in `layers` must be at or
    above it (`first_decoder_layer`).

    Cached: the same (model, layers, start) gives the same object, so every jitted pass built on it
    is compiled once per process (IDEAL's rounds reuse them).
    """
    from ideal_jax.model import transformer

    if start_layer and first_decoder_layer(layers) < start_layer:
        raise ValueError(f"layers below start_layer {start_layer}: {layers}")

    def outputs_fn(params: Params, batch: Batch, tagged: frozenset, capture=None) -> jax.Array:
        tags = None
        if tagged:
            tags = transformer.KfacTags(
                frozenset(tagged), token_mask_bt=batch["segment_ids"] != 0, capture=capture
            )
        prefix = start_layer > 0 and PREFIX_HIDDEN in batch
        head_rows = head_at_loss_positions and LOSS_POSITIONS in batch
        return _forward(
            model_cfg,
            params,
            batch,
            kfac_tags=tags,
            start_layer=start_layer if prefix else 0,
            hidden_btd=batch[PREFIX_HIDDEN] if prefix else None,
            head_positions_bk=batch[LOSS_POSITIONS] if head_rows else None,
        )

    # The head at the loss rows only, unless it is a curvature layer itself (its K-FAC input
    # factor counts every token row, as kfac-jax's dense blocks do).
    head_at_loss_positions = not any(path.startswith("lm_head") for path in layers)
    return CurvatureProblem(
        outputs_fn=outputs_fn,
        layers=tuple(layers),
        outputs_at_loss_positions=head_at_loss_positions,
        probe_capture=not model_cfg.remat,  # recorded inputs must not come from inside a remat
    )


def first_decoder_layer(layers: tuple[str, ...] | list[str]) -> int:
    """The lowest decoder layer index N among paths "layers.N...." (or LoRA adapters
    "lora.layers.N...."), 0 if any path is outside the decoder layers (embedding, lm_head) or
    there are none."""
    indices = []
    for path in layers:
        parts = path.split(".")
        parts = parts[1:] if parts[0] == "lora" else parts
        if len(parts) < 2 or parts[0] != "layers" or not parts[1].isdigit():
            return 0
        indices.append(int(parts[1]))
    return min(indices, default=0)


def _forward(model_cfg: Any, params: Params, batch: Batch, **kwargs) -> jax.Array:
    """transformer.forward on a [B, T] batch's tokens, positions and segment ids."""
    from ideal_jax.model import transformer

    tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
    return transformer.forward(model_cfg, params, tokens, positions, segments, **kwargs)


@functools.lru_cache(maxsize=8)
def _prefix_fn(model_cfg: Any, start_layer: int, mesh: Any):
    from ideal_jax import sharding

    def prefix(params: Params, batch: Batch) -> jax.Array:
        return _forward(model_cfg, params, batch, num_layers=start_layer, return_hidden=True)

    return jax.jit(sharding.traced_in(mesh, prefix))


def with_prefix_hidden(
    model_cfg: Any, params: Params, batch: Batch, start_layer: int, mesh: Any = None
) -> Batch:
    """`batch` with PREFIX_HIDDEN: the hidden state entering decoder layer `start_layer` (float32;
    rows over the mesh's data x fsdp axes when `mesh` is given). `batch` itself for 0."""
    if not start_layer:
        return batch
    return {**batch, PREFIX_HIDDEN: _prefix_fn(model_cfg, start_layer, mesh)(params, batch)}


# LOSS_POSITIONS / LOSS_VALID (optional [B, K] batch fields) and the host-side add_loss_positions
# live with the batches (data/batching.py): training forms its loss at those rows too.
LOSS_POSITIONS, LOSS_VALID = batching.LOSS_POSITIONS, batching.LOSS_VALID
add_loss_positions = batching.add_loss_positions


def loss_outputs(problem: CurvatureProblem, outputs: jax.Array, batch: Batch) -> jax.Array:
    """The model outputs of the loss rows, [R, C] in float32."""
    if not problem.outputs_at_loss_positions:
        outputs = batching.at_loss_positions(outputs, batch)
    return outputs.reshape(-1, outputs.shape[-1]).astype(jnp.float32)


def loss_rows(problem: CurvatureProblem, batch: Batch):
    """(targets [R] or [R, C], weights [R], real-row mask [R]) of the loss rows."""
    targets = batching.at_loss_positions(batch["targets"], batch)
    if problem.loss == "softmax_cross_entropy":
        targets = targets.reshape(-1)
    else:
        targets = targets.reshape(-1, targets.shape[-1])
    weights = batching.at_loss_positions(batch["weights"].astype(jnp.float32), batch)
    key = problem.token_mask_key
    real = (batch[key] != 0) if key and key in batch else jnp.ones_like(batch["weights"])
    real = batching.at_loss_positions(real.astype(jnp.float32), batch)
    if LOSS_POSITIONS in batch:
        valid = batch[LOSS_VALID].astype(jnp.float32)
        weights, real = weights * valid, real * valid
    return targets, weights.reshape(-1), real.reshape(-1)


def flat_rows(problem: CurvatureProblem, outputs: jax.Array, batch: Batch):
    """(outputs [R, C], targets [R] or [R, C], weights [R], real-row mask [R]) of the loss rows:
    every token row, or the K rows per example named by batch[LOSS_POSITIONS]."""
    return (loss_outputs(problem, outputs, batch), *loss_rows(problem, batch))


def with_loss_positions(batch: Batch) -> Batch:
    """`batch` with LOSS_POSITIONS naming every token row when it has none ([B, T] batches only).

    kfac-jax traces its loss once per estimator and refuses a batch of another structure; with this
    the estimator (cached per problem) takes batches with and without loss positions alike.
    """
    if LOSS_POSITIONS in batch or jnp.ndim(batch["weights"]) != 2:
        return batch
    b, t = jnp.shape(batch["weights"])
    return {
        **batch,
        LOSS_POSITIONS: jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        LOSS_VALID: jnp.ones((b, t), jnp.float32),
    }


def fisher_targets(
    problem: CurvatureProblem, mode: str, outputs_rc, batch: Batch, rng, per_example: bool = False
):
    """(targets [R] or [R, C], coefficient per row [R]) of the pseudo-loss Σ_r c_r ℓ_r whose
    gradient with respect to the outputs is the estimator's δ (the factor pass and the EK-FAC
    correction both form δ this way):

      empirical  the data's targets, c = w: δ is the gradient of the weighted loss;
      otherwise  targets drawn from the model at `outputs_rc` (softmax: one categorical draw per
                 row; squared error: outputs + N(0, 1)), c = √w, so that E Σ_r δ_r δ_rᵀ is the
                 weighted Fisher. One draw over all the rows with `rng` (kfac-jax's order), or
                 per_example: example n's rows drawn with split(rng, B)[n].
    """
    targets, weights_r, _ = loss_rows(problem, batch)
    if mode == "empirical":
        return targets, weights_r
    frozen_rc = jax.lax.stop_gradient(outputs_rc)

    def draw(key, o):
        if problem.loss == "softmax_cross_entropy":
            return jax.random.categorical(key, o, axis=-1)
        return o + jax.random.normal(key, o.shape, o.dtype)

    if not per_example:
        return draw(rng, frozen_rc), jnp.sqrt(weights_r)
    b = batch["weights"].shape[0]
    keys = jax.random.split(rng, b)
    sampled = jax.vmap(draw)(keys, frozen_rc.reshape(b, -1, frozen_rc.shape[-1]))
    return sampled.reshape(targets.shape), jnp.sqrt(weights_r)


def row_losses(problem: CurvatureProblem, outputs_rc: jax.Array, targets: jax.Array) -> jax.Array:
    """Unweighted per-row loss ℓ_r [R]."""
    if problem.loss == "softmax_cross_entropy":
        logp_rc = jax.nn.log_softmax(outputs_rc, axis=-1)
        return -jnp.take_along_axis(logp_rc, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return 0.5 * jnp.sum((outputs_rc - targets) ** 2, axis=-1)


def weighted_loss_sum(problem: CurvatureProblem, params: Params, batch: Batch):
    """(Σ_r w_r ℓ_r, Σ_r w_r) of one batch, untagged forward."""
    outputs_rc, targets, weights_r, _ = flat_rows(
        problem, problem.outputs_fn(params, batch, frozenset()), batch
    )
    return jnp.sum(weights_r * row_losses(problem, outputs_rc, targets)), jnp.sum(weights_r)
