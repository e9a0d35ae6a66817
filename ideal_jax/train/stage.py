"""The training stage of a round: SFT on the round's mixture from given parameters (full, freeze
or LoRA: cfg.train.finetuning, train/finetuning.py), into RDIR/train (checkpoints, metrics,
summary.json); a rerun resumes from the checkpoints. A LoRA round hands the next stages the base
model with its adapters in params["lora"] (ideal_jax/model/lora.py): evaluation runs the adapted
model, influence differentiates the adapters, export merges them."""

from __future__ import annotations

import os

from ideal_jax.artifacts import write_json
from ideal_jax.data import batching, mixture
from ideal_jax.data.suite import Suite, count_tokens, mixture_batches
from ideal_jax.train import finetuning as finetuning_lib
from ideal_jax.train.loop import run_sft


def train_done(rdir: str) -> bool:
    return os.path.exists(os.path.join(rdir, "train", "summary.json"))


def run_root(rdir: str) -> str:
    """The run's workdir (the nearest directory above `rdir` holding config.json; else rdir's
    parent), where per-run caches live."""
    here = os.path.dirname(os.path.abspath(rdir))
    probe = here
    while True:
        if os.path.exists(os.path.join(probe, "config.json")):
            return probe
        parent = os.path.dirname(probe)
        if parent == probe:
            return here
        probe = parent


def prefix_cache_dir(train_cfg, rdir: str) -> str | None:
    """Where the run keeps the freeze prefix cache (train/prefix_cache.py): WORKDIR/prefix_cache
    at the run's root, shared by training and the influence stage; None without freeze."""
    if train_cfg.finetuning != "freeze" or not train_cfg.get("prefix_cache", True):
        return None
    return os.path.join(run_root(rdir), "prefix_cache")


def train_round(
    train_cfg,
    data_cfg,
    model_cfg,
    mesh,
    rdir: str,
    suite: Suite,
    mix: mixture.Mixture,
    init_params,
    *,
    show_progress: bool = True,
    steps_per_epoch: int | None = None,
):
    """SFT (cfg.train; batching from cfg.data) on `mix` from `init_params`; the trained params.

    steps_per_epoch: the run's training budget (suite.d0_steps_per_epoch), else the mixture's
    own epoch. RDIR/train/summary.json records the steps and the tokens trained.
    """
    pad_id = suite.tokenizer.pad_token_id or 0
    batches_for_epoch, steps = mixture_batches(
        suite, mix, train_cfg, data_cfg, pad_id, steps_per_epoch
    )
    spec = finetuning_lib.from_config(train_cfg, model_cfg.num_layers)
    if init_params is not None and "lora" in init_params:  # warm start from a LoRA round
        init_params = finetuning_lib.merged_params(init_params, model_cfg, mesh)
    params, train_summary = run_sft(
        model_cfg,
        train_cfg,
        mesh,
        os.path.join(rdir, "train"),
        batches_for_epoch,
        steps,
        init_params=init_params,
        domain_names=suite.domain_names,
        progress=show_progress,
        finetuning=spec,
        loss_rows=batching.loss_rows_bound(
            [ex for exs in suite.tokenized.values() for ex in exs], int(train_cfg.seq_len)
        ),
        # At the run's root: every round, compare method and seed reads what another computed.
        prefix_cache_dir=prefix_cache_dir(train_cfg, rdir),
    )
    if not train_done(rdir):
        train_summary["steps_per_epoch"] = int(steps)
        train_summary.update(count_tokens(batches_for_epoch, train_cfg.epochs))
        write_json(os.path.join(rdir, "train", "summary.json"), train_summary)
    return params
