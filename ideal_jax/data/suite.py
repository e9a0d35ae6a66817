"""The run's data: training domains, reference set, tokenizer and evaluation tasks (a Suite),
loaded once per run from cfg.data (building the embedded demo suite if asked), and the batches of
a round's mixture for training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from typing import Any

import jax
import numpy as np
from absl import logging

from ideal_jax.data import batching, demo_suite, formatting, mixture, records
from ideal_jax.data.domains import load_domains, load_reference
from ideal_jax.model import hf_io
from ideal_jax.utils import progress
from ideal_jax.utils.atomic import atomic_path
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
            with atomic_path(demo_dir) as tmp:
                demo_suite.build_demo_suite(
                    tmp,
                    seed=cfg.seed,
                    train_sizes=dict(data.demo_train_sizes),
                    n_test=data.demo_n_test,
                    n_ref=data.demo_n_ref,
                    pool_factor=data.demo_pool_factor,
                )
        train_paths = {
            cap: os.path.join(demo_dir, "train", f"{cap}.jsonl")
            for cap in data.demo_train_sizes
            if data.demo_train_sizes[cap] > 0
        }
        domains = load_domains(train_paths)
        # Capabilities: those with a training domain (a harmful domain is none; demo_suite.py).
        capabilities = tuple(c for c in demo_suite.CAPABILITIES if c in train_paths)
        reference = load_reference(
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
        domains = load_domains(
            sources,
            domain_names=tuple(data.domain_names) or None,
            field_map=field_map,
            group_field=data.domain_field,
        )
        reference = load_reference(
            dict(data.reference) or data.reference_source, field_map=field_map
        )
        tokenizer = load_run_tokenizer(cfg, workdir)
    domains = cap_domains(domains, data.max_examples_per_domain, seed=cfg.seed)
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
    if cfg.reweight.accept_on == "dev_score":  # the step policy scores the dev rows too
        eval_tasks["dev"] = dev_task(reference, cfg.eval)
    if not ref_tokenized:
        raise InputError(
            "the reference set has no example with response tokens", field="data.reference"
        )
    return Suite(domains, reference, tokenizer, tokenized, ref_tokenized, stats, eval_tasks)


def dev_task(reference: dict[str, list[records.Example]], eval_cfg) -> dict:
    """The reference (dev) set as an exact-match task "dev" (reweight.accept_on = dev_score):
    each example's last user turn is the prompt, its response the answer. Its scores feed the
    step policy only; summary tables and comparisons score the test tasks."""
    rows = []
    for cap, examples in reference.items():
        for ex in examples:
            users = [content for role, content in ex.messages if role == "user"]
            prompt = users[-1] if users else (ex.messages[-1][1] if ex.messages else "")
            rows.append({"id": ex.id, "capability": cap, "prompt": prompt, "response": ex.response})
    return {
        "type": "exact_match",
        "records": rows,
        "max_new_tokens": eval_cfg.max_new_tokens,
        "batch_size": eval_cfg.batch_size,
    }


def initial_sizes(cfg) -> dict[str, int]:
    """D0's share of each domain's source (data.initial_sizes; on the demo with a pool factor
    above 1, the demo's train sizes). A domain not named keeps its whole source."""
    sizes = {name: int(n) for name, n in cfg.data.initial_sizes.items()}
    # (DaaR pseudo-domains, daar.use_for_ideal, are not the demo's domains: no demo shares.)
    if cfg.data.demo and cfg.data.demo_pool_factor > 1 and not cfg.daar.use_for_ideal:
        demo = {n: int(v) for n, v in cfg.data.demo_train_sizes.items() if v > 0}
        sizes = {**demo, **sizes}
    return sizes


def d0_source_ids(cfg, suite: Suite) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(D0's example ids per domain, each domain's whole pool of ids)."""
    from ideal_jax.data import mixture as mixture_lib

    pools = {n: [t.example_id for t in items] for n, items in suite.tokenized.items()}
    d0 = mixture_lib.initial_shares(pools, initial_sizes(cfg), seed=cfg.seed)
    return d0, pools


def cap_domains(
    domains: dict[str, list[records.Example]], max_examples: int, *, seed: int
) -> dict[str, list[records.Example]]:
    """At most `max_examples` of each domain (0: all): a random subset drawn with `seed` (one
    stream per domain, keyed by its name, so a domain's subset does not depend on the others),
    in file order. Logs each domain it cut."""
    if not max_examples:
        return domains
    out = {}
    for name, examples in domains.items():
        if len(examples) <= max_examples:
            out[name] = examples
            continue
        key = zlib.crc32(name.encode())
        keep = np.random.default_rng([seed, key]).choice(len(examples), max_examples, replace=False)
        out[name] = [examples[i] for i in sorted(keep)]
        logging.info(
            "data.max_examples_per_domain: domain %s keeps %d of %d examples",
            name,
            max_examples,
            len(examples),
        )
    return out


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
    """The run's tokenizer: data.tokenizer or model.path (dir or .gguf); on the demo suite with a
    randomly initialised model (no model.path), the suite's own small tokenizer."""
    if cfg.data.demo and not cfg.data.tokenizer and not cfg.model.path:
        return hf_io.load_tokenizer(os.path.join(workdir, "demo_data", "tokenizer"))
    tok_dir = cfg.data.tokenizer or cfg.model.path
    if not tok_dir:
        raise InputError("no tokenizer: set data.tokenizer or model.path", field="data.tokenizer")
    return hf_io.load_tokenizer(tok_dir)


def mixture_batches(
    suite: Suite,
    mix: mixture.Mixture,
    train_cfg,
    data_cfg,
    pad_id: int,
    steps_per_epoch: int | None = None,
):
    """(batches_for_epoch, steps_per_epoch) over the round's mixture, this host's rows only.

    steps_per_epoch: a fixed budget (train.budget = d0_steps: D0's steps per epoch, the same for
    every mixture). An epoch then yields exactly that many batches: the mixture's own epoch,
    cut short when it packs into more rows, or continued into further reshuffled passes over
    the mixture when it packs into fewer. None: the mixture's own epoch length.
    """
    items = mixture.materialize(mix, suite.tokenized)
    seed = int(train_cfg.seed)

    def one_pass(epoch: int, extra: int, host_index: int, host_count: int):
        # Pass 0 of an epoch is the mixture's epoch itself; further passes (only when a budget
        # asks for more steps than the mixture fills) are reshuffles keyed apart from every epoch.
        return batching.iterate_batches(
            items,
            train_cfg.batch_size,
            train_cfg.seq_len,
            data_cfg.batching,
            seed if extra == 0 else seed + 7919 * extra,
            epoch,
            host_index,
            host_count,
            domain_names=suite.domain_names,
            pad_id=pad_id,
            drop_remainder=extra > 0,
        )

    own_steps = min(
        batching.steps_per_epoch(
            items, train_cfg.batch_size, train_cfg.seq_len, data_cfg.batching, seed, epoch
        )
        for epoch in range(max(int(train_cfg.epochs), 1))
    )
    # Packing makes the row count depend on each epoch's shuffle; the trainer needs one
    # steps-per-epoch, so take the smallest (an epoch with more rows skips its last partial batch).
    steps = own_steps if steps_per_epoch is None else int(steps_per_epoch)

    def batches_for_epoch(epoch: int, host_index: int | None = None, host_count: int | None = None):
        host_index = jax.process_index() if host_index is None else host_index
        host_count = jax.process_count() if host_count is None else host_count
        produced, extra = 0, 0
        while produced < steps:
            before = produced
            for batch in one_pass(epoch, extra, host_index, host_count):
                yield batch
                produced += 1
                if produced == steps:
                    return
            if produced == before:  # a pass with no full batch: the mixture cannot fill one
                raise InputError(
                    f"the mixture fills no full batch of {train_cfg.batch_size} rows",
                    field="train.batch_size",
                )
            extra += 1

    return batches_for_epoch, steps


def count_tokens(batches_for_epoch, epochs: int) -> dict[str, int]:
    """Tokens (non-padding positions) and loss tokens (response targets) of a whole training run,
    over the global batches (every host's rows)."""
    tokens = loss_tokens = 0
    for epoch in range(max(int(epochs), 1)):
        for batch in batches_for_epoch(epoch, 0, 1):
            tokens += int((batch["segment_ids"] > 0).sum())
            loss_tokens += int((batch["weights"] > 0).sum())
    return {"tokens": tokens, "loss_tokens": loss_tokens}


def d0_steps_per_epoch(cfg, suite: Suite, d0_ids: dict[str, list[str]]) -> int | None:
    """The training budget every mixture of the run trains (train.budget): D0's own steps per
    epoch for d0_steps, None (each mixture its own) for epochs. d0_ids: `d0_source_ids`."""
    if cfg.train.budget != "d0_steps":
        return None
    d0 = mixture.build_mixture(d0_ids, None, seed=cfg.seed)
    return mixture_batches(suite, d0, cfg.train, cfg.data, suite.tokenizer.pad_token_id or 0)[1]
