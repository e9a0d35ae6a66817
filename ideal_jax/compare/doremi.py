"""DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model
Pretraining"), the baseline of issue 13: domain weights from a proxy model trained with Group DRO.

Given a reference model trained on the reference (here uniform) mixture, a proxy model starts
from the same initial parameters and trains on batches of that same mixture. At every step t
(Algorithm 1 of the paper, per token j of a domain-i example x, ℓ the response-token loss):

    λ_t[i] = 1/|tokens of i in the batch| · Σ max(ℓ_proxy,j(x) − ℓ_ref,j(x), 0)    (excess loss)
    α'_t   = softmax(log α_{t−1} + η λ_t)                           (exponentiated gradient ascent)
    α_t    = (1 − c) α'_t + c u                                      (smoothing towards uniform u)
    proxy update on  Σ_i α_t[i] · (mean token loss of domain i in the batch)

and DoReMi's domain weights are the average of α_t over all steps. As in the paper the *smoothed*
weights are carried to the next step, so no domain's weight can fall below c / k. A domain absent
from a batch gets λ = 0 (its weight only moves through the renormalisation) and adds nothing to
the proxy's loss. The proxy uses the optimizer, schedule and number of steps of an ordinary run
on the mixture (train.state.make_optimizer over train.epochs epochs). A step costs a training
step plus one forward pass of the reference (and, with grad_accum > 1, one more of the proxy).

Knobs: cfg.compare.doremi_eta (η, default 1.0) and cfg.compare.doremi_smoothing (c, default 1e-3).
`doremi_weights` writes WORKDIR/doremi.json and returns it on a rerun whose inputs are the same.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ideal_jax import artifacts, configlib, sharding
from ideal_jax.data import suite as suite_lib
from ideal_jax.model.config import ModelConfig
from ideal_jax.train.loop import BATCH_KEYS, NonFiniteLossError
from ideal_jax.train.state import abstract_train_state, make_optimizer, state_shardings
from ideal_jax.train.step import group_sums, guarded_update, weighted_token_losses
from ideal_jax.utils import progress
from ideal_jax.utils.distributed import is_lead_host
from ideal_jax.utils.errors import InputError

Batch = dict[str, jax.Array]
ARTIFACT = "doremi.json"
DEFAULT_ETA = 1.0
DEFAULT_SMOOTHING = 1e-3


@flax.struct.dataclass
class DoremiState:
    """The proxy run's state, passed in and returned by `doremi_step`.

    log_alpha_j: [J] log of the smoothed domain weights α_t of the last step (log(1/J) at t = 0).
    alpha_sum_j: [J] Σ_t α_t over the updates applied so far (their mean is DoReMi's answer).
    nonfinite_step: -1, or the step at which a loss or gradient was first non-finite; from then
      on nothing is updated (as in train.step.train_step).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    log_alpha_j: jax.Array
    alpha_sum_j: jax.Array
    nonfinite_step: jax.Array


def domain_statistics(
    proxy_bt: jax.Array,
    reference_bt: jax.Array,
    weights_bt: jax.Array,
    domain_ids_bt: jax.Array,
    num_domains: int,
) -> dict[str, jax.Array]:
    """Per-domain sums ([J] each) from weighted token losses (token loss × weight, as returned by
    train.step.weighted_token_losses): the clipped excess, the proxy's loss, the token count.

    The excess is clipped per token before summing (Algorithm 1); padding (domain -1) is dropped.
    """
    excess_bt = jnp.maximum(proxy_bt - reference_bt, 0.0)
    return {
        "excess_sums": group_sums(excess_bt, domain_ids_bt, num_domains),
        "loss_sums": group_sums(proxy_bt, domain_ids_bt, num_domains),
        "tokens": group_sums(weights_bt, domain_ids_bt, num_domains),
    }


def update_domain_weights(
    log_alpha_j: jax.Array,
    excess_j: jax.Array,
    present_j: jax.Array,
    eta: float,
    smoothing: float,
) -> tuple[jax.Array, jax.Array]:
    """One DoReMi weight step: (log α_t, α_t) from log α_{t−1} and the per-domain excess λ_t.

    Domains not present in the batch get λ = 0 (whatever `excess_j` holds for them).
    """
    excess_j = jnp.where(present_j, excess_j, 0.0)
    alpha_j = jax.nn.softmax(log_alpha_j + eta * excess_j)
    smoothed_j = (1.0 - smoothing) * alpha_j + smoothing / alpha_j.shape[-1]
    return jnp.log(smoothed_j), smoothed_j


def _split_microbatches(batch: Batch, grad_accum: int, mesh: Mesh | None) -> Batch:
    """[B, T] -> [k, B/k, T], microbatch j = rows j, j+k, ... (as train.step: no data moves)."""

    def split(x_bt):
        b = x_bt.shape[0]
        x_kbt = jnp.swapaxes(x_bt.reshape(b // grad_accum, grad_accum, *x_bt.shape[1:]), 0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, ("data", "fsdp"), None)
            x_kbt = jax.lax.with_sharding_constraint(x_kbt, NamedSharding(mesh, spec))
        return x_kbt

    return jax.tree.map(split, batch)


def _token_coefficients(coef_j: jax.Array, domain_ids_bt: jax.Array) -> jax.Array:
    """[B, T]: each token's coefficient in Σ_i α_i · mean loss_i (α_i / tokens_i; 0 on padding)."""
    valid_bt = (domain_ids_bt >= 0) & (domain_ids_bt < coef_j.shape[0])
    return jnp.where(valid_bt, coef_j[jnp.clip(domain_ids_bt, 0, coef_j.shape[0] - 1)], 0.0)


def doremi_step(
    state: DoremiState,
    batch: Batch,
    reference_params: Any,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    num_domains: int,
    eta: float,
    smoothing: float,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
) -> tuple[DoremiState, dict[str, jax.Array]]:
    """One DoReMi step: the weight update, then one proxy update on the α-weighted loss.

    With grad_accum = 1 the proxy's forward pass serves both the excess and the gradient (a vjp
    whose cotangent is each token's coefficient). With grad_accum > 1 the weights need the whole
    batch's statistics before any gradient, so a first scan gathers them and a second one
    accumulates the gradient (one extra forward pass).
    """
    reference_params = jax.lax.stop_gradient(reference_params)

    def losses(params, mb):
        return weighted_token_losses(model_cfg, params, mb)

    def statistics(proxy_bt, mb):
        reference_bt = losses(reference_params, mb)
        return domain_statistics(
            proxy_bt, reference_bt, mb["weights"], mb["domain_ids"], num_domains
        )

    if grad_accum == 1:
        proxy_bt, pullback = jax.vjp(lambda p: losses(p, batch), state.params)
        stats = statistics(proxy_bt, batch)
    else:
        micro = _split_microbatches(batch, grad_accum, mesh)

        def stats_body(acc, mb):
            stats = statistics(losses(state.params, mb), mb)
            return jax.tree.map(jnp.add, acc, stats), None

        zeros = {k: jnp.zeros(num_domains) for k in ("excess_sums", "loss_sums", "tokens")}
        stats, _ = jax.lax.scan(stats_body, zeros, micro)

    present_j = stats["tokens"] > 0
    tokens_j = jnp.maximum(stats["tokens"], 1.0)
    excess_j = stats["excess_sums"] / tokens_j
    log_alpha_j, alpha_j = update_domain_weights(
        state.log_alpha_j, excess_j, present_j, eta, smoothing
    )
    # The proxy's objective: Σ_i α_i · (mean token loss of domain i); α is a constant here.
    coef_j = jnp.where(present_j, jax.lax.stop_gradient(alpha_j) / tokens_j, 0.0)
    loss = jnp.sum(coef_j * stats["loss_sums"])
    if grad_accum == 1:
        (grads,) = pullback(_token_coefficients(coef_j, batch["domain_ids"]))
    else:

        def grad_body(acc, mb):
            coef_bt = _token_coefficients(coef_j, mb["domain_ids"])
            grads = jax.grad(lambda p: jnp.sum(coef_bt * losses(p, mb)))(state.params)
            return jax.tree.map(jnp.add, acc, grads), None

        grads, _ = jax.lax.scan(grad_body, jax.tree.map(jnp.zeros_like, state.params), micro)

    grad_norm = optax.global_norm(grads)
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(alpha_j))
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_state = guarded_update(
        state,
        is_finite,
        params=new_params,
        opt_state=new_opt_state,
        log_alpha_j=log_alpha_j,
        alpha_sum_j=state.alpha_sum_j + alpha_j,
    )
    metrics = {
        "alpha_j": alpha_j,
        "excess_j": jnp.where(present_j, excess_j, 0.0),
        "loss": loss,
        "grad_norm": grad_norm,
        "is_finite": is_finite,
    }
    return new_state, metrics


def init_doremi_state(params: Any, optimizer: optax.GradientTransformation, num_domains: int):
    return DoremiState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        log_alpha_j=jnp.full((num_domains,), -math.log(num_domains), jnp.float32),
        alpha_sum_j=jnp.zeros((num_domains,), jnp.float32),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def doremi_shardings(model_cfg: ModelConfig, optimizer, mesh: Mesh) -> DoremiState:
    """Parameters and Adam moments as the trainer shards them; the rest replicated."""
    train_sh = state_shardings(abstract_train_state(model_cfg, optimizer), model_cfg, mesh)
    replicated = sharding.replicated(mesh)
    return DoremiState(
        step=replicated,
        params=train_sh.params,
        opt_state=train_sh.opt_state,
        log_alpha_j=replicated,
        alpha_sum_j=replicated,
        nonfinite_step=replicated,
    )


def make_doremi_step(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    shardings: DoremiState,
    mesh: Mesh,
    *,
    num_domains: int,
    eta: float,
    smoothing: float,
    grad_accum: int = 1,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[DoremiState, Batch, Any], tuple[DoremiState, dict[str, jax.Array]]]:
    """The module-level doremi_step, bound with functools.partial and jitted once (state donated;
    the reference parameters are read only). compiler_options: as train.step.jit_train_step's
    (tests only)."""
    step_fn = functools.partial(
        doremi_step,
        model_cfg=model_cfg,
        optimizer=optimizer,
        num_domains=num_domains,
        eta=float(eta),
        smoothing=float(smoothing),
        grad_accum=grad_accum,
        mesh=mesh if grad_accum > 1 else None,
    )
    return jax.jit(
        step_fn,
        in_shardings=(shardings, sharding.batch_sharding(mesh), shardings.params),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )


def doremi_settings(cfg) -> tuple[float, float]:
    """(η, c) from cfg.compare, defaults where the section or field is missing; InputError
    naming the field for a value out of range."""
    section = cfg.get("compare", None) or {}
    eta = section.get("doremi_eta", DEFAULT_ETA)
    smoothing = section.get("doremi_smoothing", DEFAULT_SMOOTHING)
    for field, value, ok, what in (
        ("compare.doremi_eta", eta, lambda v: v > 0, "> 0"),
        ("compare.doremi_smoothing", smoothing, lambda v: 0 <= v < 1, "in [0, 1)"),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"must be a number {what}, got {value!r}", field=field)
        if not (math.isfinite(value) and ok(value)):
            raise InputError(f"must be finite and {what}, got {value!r}", field=field)
    return float(eta), float(smoothing)


def _fingerprint(cfg, model_cfg: ModelConfig, suite, mix, eta: float, smoothing: float) -> str:
    """What the weights depend on; logging cadence and other modes' sections are left out."""
    inputs = {
        "train": configlib.to_dict(cfg.train),
        "data": configlib.to_dict(cfg.data),
        "model": repr(model_cfg),
        "seed": cfg.get("seed", None),
        "domains": list(suite.domain_names),
        "mixture": json.dumps(mix.to_manifest(), sort_keys=True),
        "doremi": {"eta": eta, "smoothing": smoothing},
    }
    return configlib.fingerprint(inputs)


def doremi_weights(
    cfg,
    model_cfg,
    mesh,
    suite,
    mix,
    init_params,
    reference_params,
    workdir: str,
    *,
    compiler_options: dict[str, Any] | None = None,
) -> dict:
    """DoReMi's domain weights for `mix` (the reference mixture the reference model was trained on).

    Returns {"weights": {domain: mean α, sums to 1}, "final_weights": {domain: last α}, "steps",
    "eta", "smoothing", "trajectory": [[α per domain] every train.log_every steps and at the end],
    "trajectory_steps", "excess_trajectory": [[λ per domain] at the same steps], "domains",
    "config": fingerprint of the inputs} and writes it atomically to WORKDIR/doremi.json. A rerun
    whose inputs have the same fingerprint returns the file without training; one with other
    inputs is an InputError (nothing is overwritten). compiler_options: XLA options for the
    step (tests only; they change compile time, not results).
    """
    eta, smoothing = doremi_settings(cfg)
    path = os.path.join(workdir, ARTIFACT)
    fingerprint = _fingerprint(cfg, model_cfg, suite, mix, eta, smoothing)
    if os.path.exists(path):
        previous = artifacts.read_json(path)
        if previous.get("config") != fingerprint:
            raise InputError(
                "this DoReMi result was computed from other inputs (config, mixture or DoReMi "
                "settings); delete it to recompute or use a new --workdir",
                path=path,
                field="config",
            )
        return previous

    names = list(suite.domain_names)
    num_domains = len(names)
    train_cfg = cfg.train
    batch_size, accum = int(train_cfg.batch_size), int(train_cfg.grad_accum)
    if accum < 1 or batch_size % accum or (batch_size // accum) % sharding.batch_divisor(mesh):
        raise InputError(
            f"batch_size={batch_size} must split into grad_accum={accum} microbatches whose rows "
            f"divide evenly over the mesh's {sharding.batch_divisor(mesh)} data x fsdp devices",
            field="train.batch_size",
        )
    pad_id = suite.tokenizer.pad_token_id or 0
    batches_for_epoch, steps_per_epoch = suite_lib.mixture_batches(
        suite, mix, train_cfg, cfg.data, pad_id
    )
    total_steps = int(train_cfg.epochs) * int(steps_per_epoch)
    if total_steps < 1:
        raise InputError("the mixture gives no training step", field="train.batch_size")
    every = max(int(train_cfg.log_every), 1)

    optimizer = make_optimizer(train_cfg, total_steps)
    shardings = doremi_shardings(model_cfg, optimizer, mesh)
    # The jitted init writes fresh buffers: donating the state never frees the caller's params.
    reference_params = jax.device_put(reference_params, shardings.params)
    state = jax.jit(
        functools.partial(init_doremi_state, optimizer=optimizer, num_domains=num_domains),
        out_shardings=shardings,
    )(jax.device_put(init_params, shardings.params))
    step_fn = make_doremi_step(
        model_cfg,
        optimizer,
        shardings,
        mesh,
        num_domains=num_domains,
        eta=eta,
        smoothing=smoothing,
        grad_accum=accum,
        compiler_options=compiler_options,
    )

    trajectory, excess_trajectory, trajectory_steps = [], [], []
    bar = progress.bar(total=total_steps, desc="doremi proxy", unit="step")
    try:
        step = 0
        for epoch in range(int(train_cfg.epochs)):
            for index, host_batch in enumerate(batches_for_epoch(epoch)):
                if index >= steps_per_epoch:
                    break
                batch = sharding.shard_batch({k: host_batch[k] for k in BATCH_KEYS}, mesh)
                state, metrics = step_fn(state, batch, reference_params)
                step += 1
                bar.update(1)
                if step % every and step != total_steps:
                    continue
                # The only host round-trip: the weights at the trajectory points.
                fetched, bad_step = jax.device_get((metrics, state.nonfinite_step))
                if int(bad_step) >= 0:
                    epoch_of, index_of = divmod(int(bad_step), steps_per_epoch)
                    raise NonFiniteLossError(
                        f"non-finite DoReMi proxy loss or gradient at update {int(bad_step) + 1}",
                        path=workdir,
                        record=f"epoch {epoch_of} batch {index_of}",
                        field="loss",
                    )
                trajectory.append([float(a) for a in fetched["alpha_j"]])
                excess_trajectory.append([float(e) for e in fetched["excess_j"]])
                trajectory_steps.append(step)
                top = max(range(num_domains), key=lambda j: trajectory[-1][j])
                bar.set_postfix(loss=f"{float(fetched['loss']):.4f}", top=names[top])
    finally:
        bar.close()
    if step != total_steps:
        raise InputError(
            f"the mixture's batches gave {step} steps, expected {total_steps}",
            field="train.epochs",
        )

    alpha_sum_j = np.asarray(jax.device_get(state.alpha_sum_j), np.float64)
    mean_j = alpha_sum_j / alpha_sum_j.sum()
    result = {
        "method": "doremi",
        "domains": names,
        "weights": {n: float(w) for n, w in zip(names, mean_j)},
        "final_weights": {n: float(w) for n, w in zip(names, trajectory[-1])},
        "steps": total_steps,
        "eta": eta,
        "smoothing": smoothing,
        "trajectory_every": every,
        "trajectory_steps": trajectory_steps,
        "trajectory": trajectory,
        "excess_trajectory": excess_trajectory,
        "config": fingerprint,
    }
    if is_lead_host():
        configlib.write_json_atomic(path, result)
    return result
