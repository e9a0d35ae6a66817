"""The pure training and evaluation steps (jitted once by the loop, with shardings and donation).

Loss = sum(token_loss * weights) / sum(weights) over the whole global batch: a mean over response
tokens, the same whatever the mesh (sums over sharded arrays are global). Gradient accumulation
scans over `grad_accum` microbatches inside the step, accumulating *sums* of losses and gradients
and dividing once by the batch's total weight, so k microbatches give exactly one big batch's
update (up to float summation order). Microbatch j takes rows j, j+k, j+2k, ...: every device's
contiguous block of rows then holds its share of every microbatch, and no data moves.

Parameters stay float32 (master weights); `model_cfg.dtype` sets the compute dtype of the forward.

Fine-tuning types (train/finetuning.py): gradients and the optimizer see only the trainable subtree;
the frozen one is closed over and passed through unchanged (bit-identical). With `freeze`, a batch
may carry PREFIX_HIDDEN, the hidden state entering the first trained layer (train/prefix_cache.py):
the step then runs only the layers from there up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ideal_jax import sharding
from ideal_jax.data.batching import LOSS_POSITIONS, LOSS_VALID, at_loss_positions
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import forward, token_losses
from ideal_jax.train.finetuning import Finetuning
from ideal_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# Optional batch field [B, T, D] float32: the hidden state entering decoder layer `start_layer`.
PREFIX_HIDDEN = "prefix_hidden"


def weighted_token_losses(
    model_cfg: ModelConfig, params: Any, batch: Batch, start_layer: int = 0
) -> jax.Array:
    """token_loss * weights, [B, T] float32 (zero off the response tokens), or [B, K] at
    batch[LOSS_POSITIONS] when the batch names them (`loss_row_losses`). With start_layer > 0
    and batch[PREFIX_HIDDEN], the layers below start_layer are not run."""
    return loss_row_losses(model_cfg, params, batch, start_layer)[0]


def loss_row_losses(
    model_cfg: ModelConfig, params: Any, batch: Batch, start_layer: int = 0
) -> tuple[jax.Array, jax.Array]:
    """(token_loss * weights, domain ids) at the rows that carry loss: [B, K] at
    batch[LOSS_POSITIONS] when the batch names them (the output head then runs at those K rows
    only, not at all T: on a 49k-word vocabulary the head costs more than a decoder layer; filler
    slots get weight 0 and domain id -1), else [B, T]."""
    prefix = start_layer > 0 and PREFIX_HIDDEN in batch
    positioned = LOSS_POSITIONS in batch
    logits = forward(
        model_cfg,
        params,
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        start_layer=start_layer if prefix else 0,
        hidden_btd=batch[PREFIX_HIDDEN] if prefix else None,
        head_positions_bk=batch[LOSS_POSITIONS] if positioned else None,
    )
    weights = at_loss_positions(batch["weights"], batch)
    domains = at_loss_positions(batch["domain_ids"], batch)
    if positioned:
        valid = batch[LOSS_VALID] > 0
        weights, domains = jnp.where(valid, weights, 0.0), jnp.where(valid, domains, -1)
    losses = token_losses(logits, at_loss_positions(batch["targets"], batch))
    return losses * weights, domains


def group_sums(values_bt: jax.Array, group_ids_bt: jax.Array, num_groups: int) -> jax.Array:
    """[num_groups] sums of values by group id; ids outside [0, num_groups) (-1 = pad) dropped."""
    ids = jnp.where((group_ids_bt >= 0) & (group_ids_bt < num_groups), group_ids_bt, num_groups)
    sums = jax.ops.segment_sum(values_bt.reshape(-1), ids.reshape(-1), num_segments=num_groups + 1)
    return sums[:num_groups]


def _split(finetuning: Finetuning | None, params: Any) -> tuple[Any, Any]:
    return (params, {}) if finetuning is None else finetuning.split(params)


def _join(finetuning: Finetuning | None, trainable: Any, frozen: Any) -> Any:
    return trainable if finetuning is None else finetuning.join(trainable, frozen)


def _microbatch_sums(model_cfg, num_domains, params, batch, finetuning=None):
    """Loss sum, its gradient over the trainable parameters, and the statistics the metrics
    need, for one microbatch."""
    trainable, frozen = _split(finetuning, params)
    start = 0 if finetuning is None else finetuning.first_trained_layer

    def loss_sum(t):
        weighted, domains = loss_row_losses(model_cfg, _join(finetuning, t, frozen), batch, start)
        return jnp.sum(weighted), (weighted, domains)

    (total, (weighted_bt, domains_bt)), grads = jax.value_and_grad(loss_sum, has_aux=True)(
        trainable
    )
    stats = {
        "loss_sum": total,
        "tokens": jnp.sum(batch["weights"]),
        # Segments are numbered 1..n in each row, so the row max counts its packed examples.
        "examples": jnp.sum(jnp.max(batch["segment_ids"], axis=1)).astype(jnp.float32),
        "domain_loss_sums": group_sums(weighted_bt, domains_bt, num_domains),
        "domain_tokens": group_sums(batch["weights"], batch["domain_ids"], num_domains),
    }
    return grads, stats


def _split_microbatches(batch: Batch, grad_accum: int, mesh: Mesh | None) -> Batch:
    """[B, T] -> [k, B/k, T] with microbatch j = rows j, j+k, ... (no cross-device movement)."""

    def split(x_bt):
        b = x_bt.shape[0]
        x_kbt = jnp.swapaxes(x_bt.reshape(b // grad_accum, grad_accum, *x_bt.shape[1:]), 0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (x_bt.ndim - 1)))
            x_kbt = jax.lax.with_sharding_constraint(x_kbt, NamedSharding(mesh, spec))
        return x_kbt

    return jax.tree.map(split, batch)


def guarded_update(state: Any, is_finite: jax.Array, **updated: Any) -> Any:
    """`state` with the `updated` fields taken only when the step is finite and no earlier step
    was non-finite (a non-finite run freezes; the loop reports `nonfinite_step`); the step counts
    applied updates. `state` has `step` and `nonfinite_step` fields (TrainState, DoremiState)."""
    apply = is_finite & (state.nonfinite_step < 0)
    kept = {
        name: jax.tree.map(lambda n, o: jnp.where(apply, n, o), value, getattr(state, name))
        for name, value in updated.items()
    }
    return state.replace(
        step=state.step + apply.astype(jnp.int32),
        nonfinite_step=jnp.where(
            (state.nonfinite_step < 0) & ~is_finite, state.step, state.nonfinite_step
        ),
        **kept,
    )


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    num_domains: int,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
    finetuning: Finetuning | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on a global batch of [B, T] arrays.

    Metrics (all on device): loss, grad_norm (before clipping), lr (the rate this update used),
    tokens (response tokens), examples, domain_loss_sums / domain_tokens ([num_domains]; the loop
    divides them), is_finite. A non-finite loss or gradient leaves params and optimizer state
    untouched and records the step in `state.nonfinite_step`; later updates are then skipped too.
    finetuning: which parameters train (None: all); the others pass through unchanged.
    """
    trainable, frozen = _split(finetuning, state.params)
    if grad_accum == 1:
        grads, stats = _microbatch_sums(model_cfg, num_domains, state.params, batch, finetuning)
    else:
        micro = _split_microbatches(batch, grad_accum, mesh)

        def body(carry, mb):
            grads_acc, stats_acc = carry
            grads, stats = _microbatch_sums(model_cfg, num_domains, state.params, mb, finetuning)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            return (grads_acc, jax.tree.map(jnp.add, stats_acc, stats)), None

        zero_stats = jax.eval_shape(
            lambda: _microbatch_sums(
                model_cfg,
                num_domains,
                state.params,
                jax.tree.map(lambda x: x[0], micro),
                finetuning,
            )[1]
        )
        init = (
            jax.tree.map(jnp.zeros_like, trainable),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_stats),
        )
        (grads, stats), _ = jax.lax.scan(body, init, micro)

    # A batch with no response tokens would divide by zero; the data pipeline never makes one.
    denominator = jnp.maximum(stats["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    loss = stats["loss_sum"] / denominator
    grad_norm = optax.global_norm(grads)
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = optimizer.update(grads, state.opt_state, trainable)
    new_params = _join(finetuning, optax.apply_updates(trainable, updates), frozen)
    new_state = guarded_update(state, is_finite, params=new_params, opt_state=new_opt_state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": current_learning_rate(new_opt_state),
        "tokens": stats["tokens"],
        "examples": stats["examples"],
        "domain_loss_sums": stats["domain_loss_sums"],
        "domain_tokens": stats["domain_tokens"],
        "is_finite": is_finite,
    }
    return new_state, metrics


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The injected learning rate (the schedule's value at the last update)."""
    # The schedule's own state is also keyed "learning_rate": keep only the array.
    lr = optax.tree_utils.tree_get(
        opt_state, "learning_rate", filtering=lambda _path, value: isinstance(value, jax.Array)
    )
    return jnp.asarray(lr, jnp.float32)


def jit_train_step(
    step_fn: Callable,
    shardings: TrainState,
    mesh: Mesh,
    *,
    compiler_options: dict[str, Any] | None = None,
) -> Callable:
    """jit a bound train step with the state's shardings, a row-sharded batch and donated state.

    compiler_options: XLA options for this step only (the tests lower the CPU backend's
    optimisation level to compile about twice as fast; leave None for real runs).
    """
    return jax.jit(
        sharding.traced_in(mesh, step_fn),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def make_train_step(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    mesh: Mesh,
    *,
    num_domains: int,
    grad_accum: int = 1,
    compiler_options: dict[str, Any] | None = None,
    finetuning: Finetuning | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The module-level train_step, bound with functools.partial and jitted once."""
    step_fn = functools.partial(
        train_step,
        model_cfg=model_cfg,
        optimizer=optimizer,
        num_domains=num_domains,
        grad_accum=grad_accum,
        mesh=mesh if grad_accum > 1 else None,
        finetuning=finetuning,
    )
    return jit_train_step(step_fn, shardings, mesh, compiler_options=compiler_options)


def eval_step(
    params: Any, batch: Batch, *, model_cfg: ModelConfig, num_groups: int
) -> dict[str, jax.Array]:
    """Per-group response-token loss sums and counts ([num_groups] each).

    The group of a token is `batch["domain_ids"]` (for reference sets: the capability index).
    Sum these over batches and divide to get each group's mean loss.
    """
    weighted_bt = weighted_token_losses(model_cfg, params, batch)
    return {
        "loss_sums": group_sums(weighted_bt, batch["domain_ids"], num_groups),
        "token_counts": group_sums(batch["weights"], batch["domain_ids"], num_groups),
    }


def make_eval_step(
    model_cfg: ModelConfig, param_shardings: Any, mesh: Mesh, *, num_groups: int
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """eval_step bound and jitted once (params not donated: training goes on with them)."""
    return jax.jit(
        sharding.traced_in(
            mesh, functools.partial(eval_step, model_cfg=model_cfg, num_groups=num_groups)
        ),
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )
