"""The evaluation stage of a round: task scores (cfg.eval) and reference losses → eval.json."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from ideal_jax import sharding
from ideal_jax.data import batching
from ideal_jax.data.suite import Suite
from ideal_jax.model import lora
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import abstract_params, logical_axes


@functools.lru_cache(maxsize=8)
def _eval_step(model_cfg: ModelConfig, mesh, num_groups: int):
    """The jitted per-group loss step, built once per process (every round evaluates with it)."""
    from ideal_jax.train.step import make_eval_step

    shardings = sharding.param_shardings(abstract_params(model_cfg), logical_axes(model_cfg), mesh)
    return make_eval_step(model_cfg, shardings, mesh, num_groups=num_groups)


def reference_losses(
    model_cfg, params, suite: Suite, mesh, batch_size: int, seq_len: int, pad_id: int
) -> dict[str, float]:
    """Mean response-token loss of the model on each reference capability and on all of it."""
    caps = suite.capabilities
    step = _eval_step(model_cfg, mesh, len(caps))
    sums, counts = np.zeros(len(caps)), np.zeros(len(caps))
    for batch in batching.iterate_batches(
        suite.reference_tokenized,
        batch_size,
        seq_len,
        "pad",
        0,
        0,
        jax.process_index(),
        jax.process_count(),
        domain_names=caps,
        pad_id=pad_id,
    ):
        out = step(params, sharding.shard_batch(batch, mesh))
        sums += np.asarray(out["loss_sums"])
        counts += np.asarray(out["token_counts"])
    losses = {cap: float(s / max(c, 1)) for cap, s, c in zip(caps, sums, counts)}
    losses["all"] = float(sums.sum() / max(counts.sum(), 1))
    return losses


def evaluate_round(
    eval_cfg,
    model_cfg,
    params,
    suite: Suite,
    mesh,
    *,
    seed: int,
    loss_batch_size: int,
    seq_len: int,
    show_progress: bool = True,
) -> dict[str, Any]:
    """eval.json: benchmark / demo scores per capability and reference losses per capability
    (batches of `loss_batch_size` rows of `seq_len` tokens)."""
    from ideal_jax.evaluate import model_adapter
    from ideal_jax.evaluate.runner import evaluate_tasks

    params = lora.merge(params)  # train.finetuning = lora: the adapted model as plain weights
    generate_fn = model_adapter.make_generate_fn(
        model_cfg, params, suite.tokenizer, batch_size=eval_cfg.batch_size, seed=seed
    )
    loglik_fn = model_adapter.make_loglik_fn(
        model_cfg, params, suite.tokenizer, batch_size=eval_cfg.batch_size
    )
    sandbox = eval_cfg.code_sandbox  # docs/sandbox.md
    results = evaluate_tasks(
        suite.eval_tasks, generate_fn, loglik_fn, progress=show_progress, code_sandbox=sandbox
    )
    pad_id = suite.tokenizer.pad_token_id or 0
    results["reference_loss"] = reference_losses(
        model_cfg, params, suite, mesh, loss_batch_size, seq_len, pad_id
    )
    return results
