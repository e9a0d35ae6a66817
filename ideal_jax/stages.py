"""The stages of one IDEAL round, each resumable from the artifact it writes.

`ideal.py` strings these together; each function takes the config section(s) it needs and does
its own disk I/O (artifacts are written atomically and, on a multi-host run, by process 0 only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from ideal_jax import provenance, sharding
from ideal_jax.configlib import write_json_atomic
from ideal_jax.data import batching, demo_suite, formatting, mixture, records
from ideal_jax.model import hf_io
from ideal_jax.model.config import ModelConfig, preset
from ideal_jax.model.transformer import abstract_params, init_params, logical_axes
from ideal_jax.utils import progress, workdir_lock
from ideal_jax.utils.distributed import is_lead_host
from ideal_jax.utils.errors import InputError


@dataclasses.dataclass
class Suite:
    """Everything loaded once per run: domains, reference set, tokenizer, evaluation tasks."""

    domains: dict[str, list[records.Example]]
    reference: dict[str, list[records.Example]]
    tokenizer: Any
    tokenized: dict[str, list[formatting.TokenizedExample]]
    reference_tokenized: list[formatting.TokenizedExample]
    format_stats: dict[str, Any]
    eval_tasks: dict[str, dict]

    @property
    def domain_names(self) -> tuple[str, ...]:
        return tuple(self.domains)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(self.reference)


def write_json(path: str, obj: Any) -> None:
    if is_lead_host():
        write_json_atomic(path, obj)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(
            f"artifact is not valid JSON ({e}); delete it to recompute", path=path
        ) from None


def load_suite(cfg, workdir: str) -> Suite:
    """Domains, reference set and tokenizer from cfg.data (building the demo suite if asked)."""
    with progress.stage("load data"):
        return _load_suite(cfg, workdir)


def _load_suite(cfg, workdir: str) -> Suite:
    data = cfg.data
    field_map = dict(data.field_map) or None
    eval_tasks = {name: dict(task) for name, task in cfg.eval.tasks.items()}
    if data.demo:
        demo_dir = os.path.join(workdir, "demo_data")
        if not os.path.exists(os.path.join(demo_dir, "tokenizer", "tokenizer.json")):
            # Built into a temporary directory and renamed: a crash leaves no half-built suite.
            tmp = workdir_lock.unique_tmp(demo_dir)  # unique per process
            demo_suite.build_demo_suite(
                tmp,
                seed=cfg.seed,
                train_sizes=dict(data.demo_train_sizes),
                n_test=data.demo_n_test,
                n_ref=data.demo_n_ref,
            )
            os.replace(tmp, demo_dir)
        train_paths = {
            cap: os.path.join(demo_dir, "train", f"{cap}.jsonl")
            for cap in data.demo_train_sizes
            if data.demo_train_sizes[cap] > 0
        }
        domains = records.load_domains(train_paths)
        # Capabilities: those with a training domain (a harmful domain is none; demo_suite.py).
        capabilities = tuple(c for c in demo_suite.CAPABILITIES if c in train_paths)
        reference = records.load_reference(
            os.path.join(demo_dir, "ref.jsonl"), capability_names=capabilities
        )
        tokenizer = load_run_tokenizer(cfg, workdir)
        if cfg.eval.demo:
            test_records = []
            for cap in capabilities:  # eval.limit applies per capability
                with open(os.path.join(demo_dir, "test", f"{cap}.jsonl")) as f:
                    lines = [json.loads(line) for line in f if line.strip()]
                test_records += lines[: cfg.eval.limit or None]
            eval_tasks["demo"] = {
                "type": "exact_match",
                "records": test_records,
                "max_new_tokens": cfg.eval.max_new_tokens,
                "batch_size": cfg.eval.batch_size,
            }
    else:
        sources = dict(data.domains) or data.source
        if not sources:
            raise InputError(
                "no training data: set data.domains or data.source (or data.demo)",
                field="data.domains",
            )
        domains = records.load_domains(
            sources,
            domain_names=tuple(data.domain_names) or None,
            field_map=field_map,
            group_field=data.domain_field,
        )
        reference = records.load_reference(
            dict(data.reference) or data.reference_source, field_map=field_map
        )
        tokenizer = load_run_tokenizer(cfg, workdir)
    tokenize = functools.partial(
        formatting.tokenize_examples,
        tokenizer=tokenizer,
        max_len=data.max_len,
        truncate=data.truncate,
    )
    tokenized, stats = tokenize_domains(domains, tokenize)
    # Reference examples are grouped by capability: the capability is their "domain" in batches.
    ref_examples = [
        dataclasses.replace(ex, domain=cap) for cap, exs in reference.items() for ex in exs
    ]
    ref_tokenized, ref_stats = tokenize(progress.bar(ref_examples, "tokenize reference", unit="ex"))
    stats["reference"] = ref_stats.to_dict()
    if not ref_tokenized:
        raise InputError(
            "the reference set has no example with response tokens", field="data.reference"
        )
    return Suite(domains, reference, tokenizer, tokenized, ref_tokenized, stats, eval_tasks)


def tokenize_domains(domains, tokenize) -> tuple[dict, dict]:
    tokenized, stats = {}, {}
    bar = progress.bar(total=sum(len(exs) for exs in domains.values()), desc="tokenize", unit="ex")
    for name, examples in domains.items():
        bar.set_postfix_str(name)
        tokenized[name], domain_stats = tokenize(examples)
        bar.update(len(examples))
        stats[name] = domain_stats.to_dict()
    bar.close()
    return tokenized, stats


def with_domains(suite: Suite, domains: dict[str, list[records.Example]], data_cfg) -> Suite:
    """The suite with other training domains (e.g. DaaR pseudo-domains of an unlabeled pool)."""
    tokenize = functools.partial(
        formatting.tokenize_examples,
        tokenizer=suite.tokenizer,
        max_len=data_cfg.max_len,
        truncate=data_cfg.truncate,
    )
    tokenized, stats = tokenize_domains(domains, tokenize)
    return dataclasses.replace(
        suite, domains=domains, tokenized=tokenized, format_stats={**suite.format_stats, **stats}
    )


def load_run_tokenizer(cfg, workdir: str):
    """The run's tokenizer: the demo suite's, else data.tokenizer or model.path (dir or .gguf)."""
    if cfg.data.demo:
        return hf_io.load_tokenizer(os.path.join(workdir, "demo_data", "tokenizer"))
    tok_dir = cfg.data.tokenizer or cfg.model.path
    if not tok_dir:
        raise InputError("no tokenizer: set data.tokenizer or model.path", field="data.tokenizer")
    return hf_io.load_tokenizer(tok_dir)


def model_config(cfg, tokenizer) -> ModelConfig:
    """The architecture: read from model.path (HF dir or .gguf), else the preset sized to the
    tokenizer."""
    section = cfg.model
    extra = dict(dtype=section.dtype, remat=section.remat)
    if section.path:
        return hf_io.load_hf_config(section.path, **extra)
    return preset(section.preset, vocab_size=len(tokenizer)).replace(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )


def load_model(cfg, mesh, tokenizer) -> tuple[ModelConfig, Any]:
    """The base model: a local HF checkpoint or .gguf file (loaded sharded) or a random preset
    (init sharded)."""
    with progress.stage("load model"):
        model_cfg = model_config(cfg, tokenizer)
        if cfg.model.path:
            shardings = sharding.param_shardings(
                abstract_params(model_cfg), logical_axes(model_cfg), mesh
            )
            return model_cfg, hf_io.load_hf_params(cfg.model.path, model_cfg, shardings)
        return model_cfg, _init_preset(cfg, model_cfg, mesh)


def _init_preset(cfg, model_cfg: ModelConfig, mesh):
    params, _ = sharding.sharded_init(
        functools.partial(init_params, model_cfg),
        abstract_params(model_cfg),
        logical_axes(model_cfg),
        mesh,
        jax.random.key(cfg.seed),
    )
    return params


def mixture_batches(suite: Suite, mix: mixture.Mixture, train_cfg, data_cfg, pad_id: int):
    """(batches_for_epoch, steps_per_epoch) over the round's mixture, this host's rows only."""
    items = mixture.materialize(mix, suite.tokenized)
    seed = int(train_cfg.seed)

    def batches_for_epoch(epoch: int):
        return batching.iterate_batches(
            items,
            train_cfg.batch_size,
            train_cfg.seq_len,
            data_cfg.batching,
            seed,
            epoch,
            jax.process_index(),
            jax.process_count(),
            domain_names=suite.domain_names,
            pad_id=pad_id,
        )

    # Packing makes the row count depend on each epoch's shuffle; the trainer needs one
    # steps-per-epoch, so take the smallest (an epoch with more rows skips its last partial batch).
    steps = min(
        batching.steps_per_epoch(
            items, train_cfg.batch_size, train_cfg.seq_len, data_cfg.batching, seed, epoch
        )
        for epoch in range(max(int(train_cfg.epochs), 1))
    )
    return batches_for_epoch, steps


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


class Timer:
    """Wall time per stage, kept in round_K/timings.json (stages skipped on resume keep theirs)."""

    def __init__(self, path: str):
        self.path = path
        self.times = read_json(path) if os.path.exists(path) else {}
        # "round 2" for DIR/round_2/timings.json: the label of this round's log lines and bars.
        directory = os.path.basename(os.path.dirname(os.path.abspath(path)))
        self.label = directory.replace("_", " ") if directory.startswith("round_") else ""

    def run(self, name: str, fn, *args, record: bool = True):
        start = time.perf_counter()
        with progress.stage(f"{self.label} {name}".strip()):
            out = fn(*args)
        if record:
            self.times[name] = round(time.perf_counter() - start, 3)
            write_json(self.path, self.times)
        return out


def cached(path: str, timer: Timer, name: str, fn, *args, inputs=None) -> Any:
    """The stage's artifact if it exists (resume), else run the stage and write it atomically.

    inputs: fingerprints of what the artifact depends on (ideal_jax/provenance.py); a cached
    artifact produced from other inputs, or edited since, is an InputError, not reused.
    """
    if os.path.exists(path):
        if inputs is not None:
            provenance.check(path, inputs)
        logging.info("%s: reusing %s", f"{timer.label} {name}".strip(), path)
        return read_json(path)
    out = timer.run(name, fn, *args)
    write_json(path, out)
    if inputs is not None:
        provenance.record(path, inputs)
    return out


def fix_mixture(path: str, mix: mixture.Mixture, inputs=None) -> mixture.Mixture:
    """The round's mixture: the one on disk when resuming, else `mix`, written to mixture.json."""
    if os.path.exists(path):
        if inputs is not None:
            provenance.check(path, inputs)
        return mixture.read_manifest(path)
    if is_lead_host():
        mixture.write_manifest(mix, path)
    if inputs is not None:
        provenance.record(path, inputs)
    return mix


def train_done(rdir: str) -> bool:
    return os.path.exists(os.path.join(rdir, "train", "summary.json"))


def train_round(cfg, model_cfg, mesh, rdir: str, suite: Suite, mix: mixture.Mixture, init_params):
    """SFT on the round's mixture (full-parameter, from `init_params`); resumes from checkpoints."""
    from ideal_jax.train.loop import run_sft

    pad_id = suite.tokenizer.pad_token_id or 0
    batches_for_epoch, steps = mixture_batches(suite, mix, cfg.train, cfg.data, pad_id)
    params, train_summary = run_sft(
        model_cfg,
        cfg.train,
        mesh,
        os.path.join(rdir, "train"),
        batches_for_epoch,
        steps,
        init_params=init_params,
        domain_names=suite.domain_names,
        progress=cfg.progress,
    )
    if not train_done(rdir):
        write_json(os.path.join(rdir, "train", "summary.json"), train_summary)
    return params


def evaluate_round(cfg, model_cfg, params, suite: Suite, mesh) -> dict[str, Any]:
    """eval.json: benchmark / demo scores per capability and reference losses per capability."""
    from ideal_jax.evaluate import model_adapter
    from ideal_jax.evaluate.runner import evaluate_tasks

    generate_fn = model_adapter.make_generate_fn(
        model_cfg, params, suite.tokenizer, batch_size=cfg.eval.batch_size, seed=cfg.seed
    )
    loglik_fn = model_adapter.make_loglik_fn(
        model_cfg, params, suite.tokenizer, batch_size=cfg.eval.batch_size
    )
    sandbox = cfg.eval.get("code_sandbox", "bwrap")  # docs/sandbox.md
    results = evaluate_tasks(
        suite.eval_tasks, generate_fn, loglik_fn, progress=cfg.progress, code_sandbox=sandbox
    )
    results["reference_loss"] = reference_losses(
        model_cfg,
        params,
        suite,
        mesh,
        cfg.influence.batch_size,
        cfg.train.seq_len,
        suite.tokenizer.pad_token_id or 0,
    )
    return results


def influence_round(
    cfg, model_cfg, params, suite: Suite, mix: mixture.Mixture, mesh, with_outer: bool = False
):
    """influence.json for the round (ideal_jax/influence/stage.py); with_outer: and Q's problem."""
    from ideal_jax.influence.stage import influence_for_round

    return influence_for_round(cfg, model_cfg, params, suite, mix, mesh, with_outer=with_outer)
