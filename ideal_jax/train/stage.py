"""The training stage of a round: full-parameter SFT on the round's mixture from given parameters,
into RDIR/train (checkpoints, metrics, summary.json); a rerun resumes from the checkpoints."""

from __future__ import annotations

import os

from ideal_jax.artifacts import write_json
from ideal_jax.data import mixture
from ideal_jax.data.suite import Suite, mixture_batches
from ideal_jax.train.loop import run_sft


def train_done(rdir: str) -> bool:
    return os.path.exists(os.path.join(rdir, "train", "summary.json"))


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
):
    """SFT (cfg.train; batching from cfg.data) on `mix` from `init_params`; the trained params."""
    pad_id = suite.tokenizer.pad_token_id or 0
    batches_for_epoch, steps = mixture_batches(suite, mix, train_cfg, data_cfg, pad_id)
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
    )
    if not train_done(rdir):
        write_json(os.path.join(rdir, "train", "summary.json"), train_summary)
    return params
