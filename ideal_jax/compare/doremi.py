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

Knobs: cfg.compare.doremi_eta (η) and cfg.compare.doremi_smoothing (c); defaults: configs/common.py.
`doremi_weights` writes WORKDIR/doremi.json and returns it on a rerun whose inputs are the same.
The jitted step of the proxy run is in doremi_proxy.py.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np

from ideal_jax import artifacts, sharding
from ideal_jax.compare import doremi_proxy as proxy
from ideal_jax.compare.config import CompareConfig
from ideal_jax.configlib.fields import fingerprint, to_dict
from ideal_jax.data import suite as suite_lib
from ideal_jax.model.config import ModelConfig
from ideal_jax.train.loop import BATCH_KEYS, NonFiniteLossError
from ideal_jax.train.state import make_optimizer
from ideal_jax.utils import progress
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.distributed import is_lead_host
from ideal_jax.utils.errors import InputError

ARTIFACT = "doremi.json"


def doremi_settings(cfg) -> tuple[float, float]:
    """(η, c) from cfg.compare (CompareConfig: InputError naming a field out of range)."""
    settings = CompareConfig.from_config_dict(cfg.compare)
    return float(settings.doremi_eta), float(settings.doremi_smoothing)


def _fingerprint(cfg, model_cfg: ModelConfig, suite, mix, eta: float, smoothing: float) -> str:
    """What the weights depend on; logging cadence and other modes' sections are left out."""
    inputs = {
        "train": to_dict(cfg.train),
        "data": to_dict(cfg.data),
        "model": repr(model_cfg),
        "seed": cfg.seed,
        "domains": list(suite.domain_names),
        "mixture": json.dumps(mix.to_manifest(), sort_keys=True),
        "doremi": {"eta": eta, "smoothing": smoothing},
    }
    return fingerprint(inputs)


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
        return _previous_result(path, fingerprint)
    names = list(suite.domain_names)
    batches_for_epoch, steps_per_epoch, total_steps = _proxy_batches(cfg, suite, mix, mesh)
    optimizer = make_optimizer(cfg.train, total_steps)
    shardings = proxy.doremi_shardings(model_cfg, optimizer, mesh)
    # The jitted init writes fresh buffers: donating the state never frees the caller's params.
    reference_params = jax.device_put(reference_params, shardings.params)
    state = jax.jit(
        functools.partial(proxy.init_doremi_state, optimizer=optimizer, num_domains=len(names)),
        out_shardings=shardings,
    )(jax.device_put(init_params, shardings.params))
    step_fn = proxy.make_doremi_step(
        model_cfg,
        optimizer,
        shardings,
        mesh,
        num_domains=len(names),
        eta=eta,
        smoothing=smoothing,
        grad_accum=int(cfg.train.grad_accum),
        compiler_options=compiler_options,
    )
    every = max(int(cfg.train.log_every), 1)
    state, trajectory = _train_proxy(
        state,
        step_fn,
        reference_params,
        mesh,
        batches_for_epoch,
        steps_per_epoch,
        epochs=int(cfg.train.epochs),
        every=every,
        names=names,
        workdir=workdir,
    )
    alpha_sum_j = np.asarray(jax.device_get(state.alpha_sum_j), np.float64)
    mean_j = alpha_sum_j / alpha_sum_j.sum()
    result = {
        "method": "doremi",
        "domains": names,
        "weights": {n: float(w) for n, w in zip(names, mean_j)},
        "final_weights": {n: float(w) for n, w in zip(names, trajectory["alpha"][-1])},
        "steps": total_steps,
        "eta": eta,
        "smoothing": smoothing,
        "trajectory_every": every,
        "trajectory_steps": trajectory["steps"],
        "trajectory": trajectory["alpha"],
        "excess_trajectory": trajectory["excess"],
        "config": fingerprint,
    }
    if is_lead_host():
        write_json_atomic(path, result)
    return result


def _previous_result(path: str, fingerprint: str) -> dict:
    """The DoReMi result at `path`, if it was computed from the same inputs (else InputError)."""
    previous = artifacts.read_json(path)
    if previous.get("config") != fingerprint:
        raise InputError(
            "this DoReMi result was computed from other inputs (config, mixture or DoReMi "
            "settings); delete it to recompute or use a new --workdir",
            path=path,
            field="config",
        )
    return previous


def _proxy_batches(cfg, suite, mix, mesh):
    """(batches_for_epoch, steps per epoch, total steps) of an ordinary run on `mix`; InputError
    for a batch that does not split over the mesh or a mixture that gives no step."""
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
    return batches_for_epoch, steps_per_epoch, total_steps


def _train_proxy(
    state,
    step_fn,
    reference_params,
    mesh,
    batches_for_epoch,
    steps_per_epoch: int,
    *,
    epochs: int,
    every: int,
    names: list[str],
    workdir: str,
):
    """Every proxy step; (final state, {"alpha", "excess", "steps"}: the weights and excess losses
    every `every` steps and at the end)."""
    total_steps = epochs * steps_per_epoch
    trajectory = {"alpha": [], "excess": [], "steps": []}
    bar = progress.bar(total=total_steps, desc="doremi proxy", unit="step")
    try:
        step = 0
        for epoch in range(epochs):
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
                trajectory["alpha"].append([float(a) for a in fetched["alpha_j"]])
                trajectory["excess"].append([float(e) for e in fetched["excess_j"]])
                trajectory["steps"].append(step)
                top = max(range(len(names)), key=lambda j: trajectory["alpha"][-1][j])
                bar.set_postfix(loss=f"{float(fetched['loss']):.4f}", top=names[top])
    finally:
        bar.close()
    if step != total_steps:
        raise InputError(
            f"the mixture's batches gave {step} steps, expected {total_steps}",
            field="train.epochs",
        )
    return state, trajectory
