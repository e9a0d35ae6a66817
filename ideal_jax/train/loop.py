"""`run_sft`: supervised fine-tuning on a deterministic stream of batches, resumable exactly.

Config fields read from the `cfg.train` section (values live in configs/common.py):
  learning_rate     peak learning rate
  warmup_steps      linear warmup length (updates)
  schedule          "cosine" | "linear" | "constant" decay after warmup
  end_lr_fraction   final learning rate as a fraction of the peak
  weight_decay      AdamW decoupled weight decay (matrices only; see state.weight_decay_mask)
  b1, b2            Adam moment decay rates
  grad_clip         global-norm clip (0 disables)
  grad_accum        microbatches per update, scanned inside one step (one call = one update)
  batch_size        global rows per update (all hosts, all microbatches)
  seq_len           tokens per row
  epochs            passes over `batches_for_epoch`
  log_every         steps between metric fetches / metrics.jsonl entries
  checkpoint_every  steps between checkpoints (a multiple of log_every keeps resumed curves exact)
  keep_checkpoints  how many recent checkpoints to keep
  seed              parameter-initialisation and state PRNG seed
  decay_embeddings  (optional, default False) whether the token embedding gets weight decay
  finetuning        full | freeze | lora (train/finetuning.py; the `finetuning` argument)
  prefix_cache, prefix_cache_gib   freeze: keep the frozen layers' output per example
                    (train/prefix_cache.py), up to this many GiB in memory, the rest on disk

Resuming: a rerun on the same workdir restores the latest checkpoint, skips the batches of the
current epoch already consumed and truncates metrics.jsonl to the restored step, so a run that was
killed and restarted gives the same loss curve and parameters as one that never stopped.
Only metrics fetches (every `log_every` steps) and checkpoint saves leave the device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ideal_jax import sharding
from ideal_jax.data import batching
from ideal_jax.model.config import ModelConfig
from ideal_jax.train.checkpoint import Checkpointer
from ideal_jax.train.finetuning import Finetuning
from ideal_jax.train.metrics import MetricsWriter, read_metrics, summarize_window
from ideal_jax.train.prefix_cache import PrefixCache
from ideal_jax.train.state import abstract_train_state, init_train_state, make_optimizer
from ideal_jax.train.state import state_shardings as make_state_shardings
from ideal_jax.train.step import PREFIX_HIDDEN, make_train_step
from ideal_jax.utils import progress as progress_lib
from ideal_jax.utils.errors import InputError

BATCH_KEYS = ("tokens", "targets", "weights", "segment_ids", "positions", "domain_ids")


class NonFiniteLossError(InputError):
    """Training met a non-finite loss or gradient; names the step and the batch that caused it."""


class DivergedError(InputError):
    """Training ended at chance level (loss ≈ ln V) or above where it started: it diverged."""


def check_divergence(entries: list[dict], vocab_size: int, workdir: str) -> None:
    """DivergedError when the logged loss is stuck near chance level (≥ 0.9 ln V, flat over the
    second half of the run and no better than its first value: a collapsed model) or ends well
    above where it started (+0.1 ln V); names the update from which it stayed there. Fewer than
    4 log lines pass unchecked."""
    losses = [(e["step"], e["loss"]) for e in entries if e.get("loss") is not None]
    if len(losses) < 4:
        return
    chance = float(np.log(vocab_size))
    values = [v for _, v in losses]
    first, last = values[0], values[-1]
    tail = values[len(values) // 2 :]
    stuck = (
        last >= 0.9 * chance
        and last >= first - 0.01 * chance
        and max(tail) - min(tail) < 0.002 * chance
    )
    if not (stuck or last > first + 0.1 * chance):
        return
    if stuck:
        bad = lambda v: abs(v - last) < 0.002 * chance
    else:
        bad = lambda v: v > first + 0.1 * chance
    since = losses[-1][0]
    for step, value in reversed(losses):
        if not bad(value):
            break
        since = step
    raise DivergedError(
        f"training diverged: the loss is {last:.3f} at the end (chance level ln V = {chance:.3f}, "
        f"first logged {first:.3f}) and stayed there from update {since}; lower "
        "train.learning_rate (or raise warmup_steps) and use a new --workdir",
        path=workdir,
        record=f"update {since}",
        field="train.learning_rate",
    )


def _check_batch_geometry(train_cfg: Any, mesh: Mesh) -> tuple[int, int, int]:
    batch_size, accum = int(train_cfg.batch_size), int(train_cfg.grad_accum)
    divisor = sharding.batch_divisor(mesh)
    if accum < 1 or batch_size % accum or (batch_size // accum) % divisor:
        raise InputError(
            f"batch_size={batch_size} must split into grad_accum={accum} microbatches whose rows "
            f"divide evenly over the mesh's data x fsdp = {divisor} devices",
            field="train.batch_size",
        )
    if jax.process_count() > 1 and batch_size % jax.process_count():
        raise InputError(
            f"batch_size={batch_size} is not a multiple of {jax.process_count()} processes",
            field="train.batch_size",
        )
    return batch_size, int(train_cfg.seq_len), accum


def _host_batch(batch: dict[str, np.ndarray], rows: int, seq_len: int, where: str):
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise InputError(f"batch lacks {missing}", record=where, field=missing[0])
    for key in BATCH_KEYS:
        if tuple(np.shape(batch[key])) != (rows, seq_len):
            raise InputError(
                f"batch array has shape {np.shape(batch[key])}, expected ({rows}, {seq_len}) "
                "(train.batch_size / process count, train.seq_len)",
                record=where,
                field=key,
            )
    return {k: batch[k] for k in BATCH_KEYS}


def run_sft(
    model_cfg: ModelConfig,
    train_cfg: Any,
    mesh: Mesh,
    workdir: str | os.PathLike,
    batches_for_epoch: Callable[[int], Iterator[dict[str, np.ndarray]]],
    steps_per_epoch: int,
    *,
    init_params: Any = None,
    eval_fn: Callable[[Any], dict[str, Any]] | None = None,
    domain_names: Sequence[str] = (),
    progress: bool = True,
    compiler_options: dict[str, Any] | None = None,
    finetuning: Finetuning | None = None,
    prefix_cache_dir: str | None = None,
    loss_rows: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train for `train_cfg.epochs` epochs of `steps_per_epoch` updates; returns (params, summary).

    batches_for_epoch(epoch) must yield the same [B, T] numpy batches every time it is called with
    the same epoch (B = this host's rows). init_params: starting parameters (e.g. a Hugging Face
    base model), else random ones from train.seed. eval_fn(params) -> dict runs once at the end;
    its result goes into the summary. Checkpoints go to workdir/checkpoints, metrics to
    workdir/metrics.jsonl and workdir/tb. compiler_options: XLA options for the step (tests only).
    finetuning: which parameters train (None: all). With LoRA the returned params hold
    params["lora"] (model/lora.py merges them). With freeze, the frozen layers' output is kept per
    example (train_cfg.prefix_cache), spilling to `prefix_cache_dir` beyond prefix_cache_gib.
    loss_rows: K >= the weighted tokens of any row (data/batching.py loss_rows_bound): the loss
    and the output head are formed at those K rows per row only (the same loss, a cheaper step;
    nothing changes when K is not below seq_len).
    """
    workdir = os.fspath(workdir)
    batch_size, seq_len, accum = _check_batch_geometry(train_cfg, mesh)
    rows = batch_size // jax.process_count()
    total_steps = int(train_cfg.epochs) * int(steps_per_epoch)
    num_domains = max(len(domain_names), 1)
    optimizer = make_optimizer(train_cfg, total_steps)
    abstract = abstract_train_state(model_cfg, optimizer, finetuning)
    shardings = make_state_shardings(abstract, model_cfg, mesh, finetuning)
    tuning = (finetuning or Finetuning("full", model_cfg.num_layers)).to_json()
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=int(train_cfg.checkpoint_every),
        keep=int(train_cfg.keep_checkpoints),
    )
    start_step, state, meta = ckpt.restore_latest(abstract, shardings)
    if start_step:
        if int(meta.get("steps_per_epoch", steps_per_epoch)) != int(steps_per_epoch):
            raise InputError(
                f"checkpoint was written with steps_per_epoch={meta['steps_per_epoch']}, this run "
                f"has {steps_per_epoch}: the data changed; use a fresh workdir",
                path=ckpt.step_path(start_step),
                field="steps_per_epoch",
            )
        if meta.get("finetuning", tuning) != tuning:
            raise InputError(
                f"checkpoint was written with {meta['finetuning']}, this run has {tuning}; use a "
                "fresh workdir",
                path=ckpt.step_path(start_step),
                field="train.finetuning",
            )
    else:
        seed_key = jax.random.key(int(train_cfg.seed))
        state, _ = init_train_state(
            model_cfg,
            optimizer,
            mesh,
            seed_key if init_params is None else init_params,
            finetuning=finetuning,
            lora_key=jax.random.fold_in(seed_key, 2),
        )
    cache = _prefix_cache(model_cfg, train_cfg, state.params, mesh, finetuning, prefix_cache_dir)
    writer = MetricsWriter(workdir, resume_step=start_step, enabled=jax.process_index() == 0)
    step_fn = make_train_step(
        model_cfg,
        optimizer,
        shardings,
        mesh,
        num_domains=num_domains,
        grad_accum=accum,
        compiler_options=compiler_options,
        finetuning=finetuning,
    )
    names = list(domain_names) or ["all"]
    bar = progress_lib.bar(  # labelled with the stage; plain lines when stderr is no terminal
        desc="steps",
        total=total_steps,
        initial=start_step,
        disable=not progress,
        unit="step",
        leave=True,
    )
    compiled, compile_s, train_s, positions = None, 0.0, 0.0, 0
    pending: list[dict[str, jax.Array]] = []
    window_start, window_t0, last_entry = start_step, None, None

    def fail_nonfinite(bad_step: int):
        ckpt.wait()
        epoch, index = divmod(bad_step, steps_per_epoch)
        good = ckpt.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at update {bad_step + 1} (epoch {epoch}, batch {index} "
            f"of the epoch); training stopped without applying it; last good checkpoint: "
            f"{'none' if good is None else ckpt.step_path(good)}",
            path=workdir,
            record=f"epoch {epoch} batch {index}",
            field="loss",
        )

    try:
        step = start_step
        for epoch in range(start_step // steps_per_epoch, int(train_cfg.epochs)):
            # Batches of this epoch consumed before the checkpoint we resumed from.
            skip = max(start_step - epoch * steps_per_epoch, 0)
            seen = 0
            for index, host_batch in enumerate(batches_for_epoch(epoch)):
                if index >= steps_per_epoch:
                    break
                seen = index + 1
                if index < skip:
                    continue
                host_batch = _host_batch(host_batch, rows, seq_len, f"epoch {epoch} batch {index}")
                if loss_rows is not None and loss_rows < seq_len:  # the head at loss rows only
                    host_batch = batching.add_loss_positions(host_batch, loss_rows)
                if cache is not None:  # freeze: the frozen layers' output, computed once
                    host_batch[PREFIX_HIDDEN] = cache.hidden(host_batch)
                batch = sharding.shard_batch(host_batch, mesh)
                if compiled is None:  # compile once, outside the timed steps
                    t0 = time.perf_counter()
                    compiled = step_fn.lower(state, batch).compile()
                    compile_s = time.perf_counter() - t0
                if window_t0 is None:
                    window_t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                pending.append(metrics)
                step += 1
                bar.update(1)
                final = step == total_steps
                if step % int(train_cfg.log_every) == 0 or final:
                    fetched = jax.device_get(pending)  # the only regular host round-trip
                    seconds = time.perf_counter() - window_t0
                    bad = [i for i, m in enumerate(fetched) if not bool(m["is_finite"])]
                    if bad:
                        fail_nonfinite(window_start + bad[0])
                    train_s += seconds
                    positions += len(fetched) * batch_size * seq_len
                    last_entry = summarize_window(
                        fetched,
                        step=step,
                        epoch=epoch,
                        domain_names=names,
                        seconds=seconds,
                        positions_per_step=batch_size * seq_len,
                    )
                    writer.write(last_entry)
                    bar.set_postfix(
                        loss=f"{last_entry['loss']:.4f}", tok_s=f"{last_entry['tokens_per_s']:.3g}"
                    )
                    pending, window_start, window_t0 = [], step, None
                if ckpt.should_save(step, final=final):
                    bad_step = int(jax.device_get(state.nonfinite_step))
                    if bad_step >= 0:  # caught before a save even when logging is sparser
                        fail_nonfinite(bad_step)
                    ckpt.save(
                        step,
                        state,
                        {
                            "step": step,
                            "epoch": step // steps_per_epoch,
                            "step_in_epoch": step % steps_per_epoch,
                            "steps_per_epoch": int(steps_per_epoch),
                            "total_steps": total_steps,
                            "finetuning": tuning,
                        },
                    )
            if seen < steps_per_epoch:
                raise InputError(
                    f"batches_for_epoch({epoch}) yielded {seen} batches, expected "
                    f"steps_per_epoch={steps_per_epoch}",
                    record=f"epoch {epoch}",
                )
        ckpt.wait()
    finally:
        bar.close()
        writer.close()
        ckpt.close()

    logged = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if last_entry is None:  # already finished before this call: report the logged curve's end
        last_entry = logged[-1] if logged else {}
    check_divergence(logged, model_cfg.vocab_size, workdir)
    summary = {
        "start_step": start_step,
        "final_step": total_steps,
        "total_steps": total_steps,
        "compile_seconds": compile_s,
        "train_seconds": train_s,
        "tokens_per_s": positions / train_s if train_s > 0 else None,
        "final_loss": last_entry.get("loss"),
        "final_domain_losses": last_entry.get("domain_losses"),
        **tuning,
        "trainable_parameters": int(
            sum(np.size(x) for x in jax.tree.leaves(_trainable(finetuning, state.params)))
        ),
    }
    if cache is not None:  # examples whose frozen-prefix output this run computed (not reused)
        summary["prefix_cache"] = {"computed": cache.computed, "key": cache.fingerprint[:16]}
    if eval_fn is not None:
        summary["eval"] = eval_fn(state.params)
    return state.params, summary


def _trainable(finetuning: Finetuning | None, params: Any) -> Any:
    return params if finetuning is None else finetuning.trainable(params)


def _prefix_cache(model_cfg, train_cfg, params, mesh, finetuning, directory) -> PrefixCache | None:
    """freeze with train.prefix_cache (single process: each host would compute other examples):
    the per-example cache of the frozen layers' output; None otherwise (the step then runs them)."""
    if (
        finetuning is None
        or finetuning.first_trained_layer < 1
        or not train_cfg.get("prefix_cache", True)
        or jax.process_count() > 1
    ):
        return None
    return PrefixCache(
        model_cfg,
        params,
        finetuning.first_trained_layer,
        int(train_cfg.seq_len),
        mesh,
        rows=int(train_cfg.batch_size),
        memory_bytes=int(float(train_cfg.get("prefix_cache_gib", 2.0)) * 2**30),
        directory=directory,
    )
