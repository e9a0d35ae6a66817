"""Demo pools for DaaR whose true domains are known (and hidden from DaaR): benchmarks and tests.

`build_premise_pool`: a pool on which DaaR's premise holds (a few redundant clusters dominate, the
capabilities the evaluation needs are in the tail), on the demo suite's capabilities.
`charset_pool`: hidden domains that write with disjoint character sets, each example mixing in a
random fraction of another domain's characters: overlapping clusters, for purity measurements.

Premise pool.

DaaR (METHOD.md §2) argues that an unlabeled SFT pool is dominated by a few over-represented,
redundant kinds of data, so that a random subset spends most of its budget on them and starves the
capabilities the evaluation needs. This builder writes such a pool from the demo suite's
capabilities (ideal_jax/data/demo_suite.py), in the demo suite's directory layout, so the usual
loaders (`suite_lib.load_suite` with cfg.data.demo) read it:

  head capabilities (default reverse, uppercase): most of the pool, every example a copy of one of
      only `head_unique` distinct items per capability: exact duplicates, redundant;
  tail capabilities (default arithmetic, sort, lookup): a few percent of the pool each, every
      example distinct;
  probe set: the same mixture and the same redundancy, drawn from items disjoint from the pool's;
  test split: `n_test` fresh items per capability, scored with equal weight (the evaluation needs
      the tail as much as the head).

Layout under `out_dir`: train/{capability}.jsonl (ids "{capability}:{i}"), probe.jsonl (ids
"probe:{capability}:{i}", with the true capability), test/{capability}.jsonl, ref.jsonl,
tokenizer/. Everything is a pure function of the arguments.
"""

from __future__ import annotations

import dataclasses
import os
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ideal_jax.data import demo_suite, demo_tasks
from ideal_jax.data.records import Example

HEAD = ("reverse", "uppercase")
TAIL = ("arithmetic", "sort", "lookup")
# Shares of the pool (and of the probe set): the head holds 85%.
DEFAULT_SHARES = {
    "reverse": 0.45,
    "uppercase": 0.40,
    "arithmetic": 0.05,
    "sort": 0.05,
    "lookup": 0.05,
}


@dataclasses.dataclass(frozen=True)
class PremisePool:
    out_dir: str
    pool: list[Example]  # domain = the true capability (hide it before DaaR sees the pool)
    probe: list[Example]  # likewise; disjoint texts from the pool
    sizes: dict[str, int]  # pool examples per capability
    unique: dict[str, int]  # distinct items per capability in the pool

    def hidden(self, examples: Sequence[Example]) -> list[Example]:
        """The examples with their labels hidden (domain "pool"), as DaaR must see them."""
        return [dataclasses.replace(ex, domain="pool") for ex in examples]


def _sizes(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of n * share (sums to n exactly)."""
    total = sum(shares.values())
    raw = {c: n * s / total for c, s in shares.items()}
    sizes = {c: int(v) for c, v in raw.items()}
    for c in sorted(raw, key=lambda c: sizes[c] - raw[c])[: n - sum(sizes.values())]:
        sizes[c] += 1
    return sizes


def _draw(
    items: list[tuple[str, str]], n: int, redundant: bool, rng: random.Random
) -> list[tuple[str, str]]:
    """n examples: copies of the given items (redundant) or the first n of them (distinct)."""
    if redundant:
        return [items[i % len(items)] for i in range(len(items))] + [
            rng.choice(items) for _ in range(max(n - len(items), 0))
        ]
    return items[:n]


def build_premise_pool(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_pool: int = 3000,
    n_probe: int = 1000,
    n_test: int = 50,
    n_ref: int = 10,
    shares: Mapping[str, float] | None = None,
    head: Sequence[str] = HEAD,
    head_unique: int = 40,
) -> PremisePool:
    """Writes the pool, probe set, test split, reference set and tokenizer; returns the examples."""
    shares = dict(DEFAULT_SHARES if shares is None else shares)
    unknown = sorted(set(shares) - set(demo_suite.CAPABILITIES))
    if unknown:
        raise ValueError(f"unknown capabilities {unknown}; known: {demo_suite.CAPABILITIES}")
    out = Path(out_dir)
    pool_sizes, probe_sizes = _sizes(n_pool, shares), _sizes(n_probe, shares)
    pool_records, probe_records, ref_records = {}, [], []
    unique = {}
    for cap in shares:
        redundant = cap in head
        n_pool_items = min(head_unique, pool_sizes[cap]) if redundant else pool_sizes[cap]
        n_probe_items = min(head_unique, probe_sizes[cap]) if redundant else probe_sizes[cap]
        items = demo_suite.generate_items(cap, n_pool_items + n_probe_items + n_test + n_ref, seed)
        pool_items = items[:n_pool_items]
        probe_items = items[n_pool_items : n_pool_items + n_probe_items]
        test_items = items[n_pool_items + n_probe_items : -n_ref or None]
        ref_items = items[len(items) - n_ref :] if n_ref else []
        rng = random.Random(seed * 1_000_003 + zlib.crc32(f"premise:{cap}".encode()))
        pool_items = _draw(pool_items, pool_sizes[cap], redundant, rng)[: pool_sizes[cap]]
        probe_items = _draw(probe_items, probe_sizes[cap], redundant, rng)[: probe_sizes[cap]]
        unique[cap] = len(set(pool_items))
        pool_records[cap] = demo_suite._train_records(cap, pool_items)
        probe_records += [
            dict(r, id=f"probe:{r['id']}", domain=cap)
            for r in demo_suite._train_records(cap, probe_items)
        ]
        demo_suite._write_jsonl(out / "train" / f"{cap}.jsonl", pool_records[cap])
        demo_suite._write_jsonl(
            out / "test" / f"{cap}.jsonl", demo_suite._eval_records(cap, "test", test_items)
        )
        ref_records += demo_suite._eval_records(cap, "ref", ref_items)
    demo_suite._write_jsonl(out / "probe.jsonl", probe_records)
    demo_suite._write_jsonl(out / "ref.jsonl", ref_records)
    demo_suite.build_tokenizer().save_pretrained(os.fspath(out / "tokenizer"))
    pool = [_example(r, cap) for cap, records in pool_records.items() for r in records]
    probe = [_example(r, r["domain"]) for r in probe_records]
    return PremisePool(os.fspath(out), pool, probe, pool_sizes, unique)


# --- overlapping clusters: disjoint character sets, mixed ---

CHARSETS = ("abcdefghijkl", "mnopqrstuvwx", "ABCDEFGHIJKL", "0123456789+-*/")
CHARSET_PRIOR = (0.4, 0.3, 0.2, 0.1)
_NOISE = demo_suite.ALPHABET[:-1]


def charset_text(rng: random.Random, primary: int, other: int, mix: float, n: int) -> str:
    """n characters: 5% uniform noise, a fraction `mix` from `other`'s set, the rest `primary`'s."""
    chars = []
    for _ in range(n):
        u = rng.random()
        if u < 0.05:
            chars.append(rng.choice(_NOISE))
        elif u < 0.05 + mix:
            chars.append(rng.choice(CHARSETS[other]))
        else:
            chars.append(rng.choice(CHARSETS[primary]))
    return "".join(chars)


def charset_pool(
    n: int, seed: int, prefix: str, max_mix: float = 0.45
) -> tuple[list[Example], list[int]]:
    """Unlabeled examples (domain "unlabeled") and their hidden domains (indices into CHARSETS).

    Domain priors 40/30/20/10%; each example mixes in a fraction m ~ U(0, max_mix) of one other
    domain's characters, so examples near m = max_mix are legitimately ambiguous.
    """
    rng = random.Random(seed)
    examples, hidden = [], []
    for i in range(n):
        p = rng.choices(range(len(CHARSETS)), CHARSET_PRIOR)[0]
        other = rng.choice([d for d in range(len(CHARSETS)) if d != p])
        mix = rng.uniform(0.0, max_mix)
        prompt = charset_text(rng, p, other, mix, rng.randint(10, 20))
        response = charset_text(rng, p, other, mix, rng.randint(10, 20))
        examples.append(Example(f"{prefix}{i}", "unlabeled", (("user", prompt),), response))
        hidden.append(p)
    return examples, hidden


def charset_respond(prompt: str, rng: random.Random) -> str:
    """A scripted 'instruct model' for `charset_pool`: a pure-domain pair for the described set.

    Domain d is described as "texts written with the characters {CHARSETS[d]}."
    """
    for d, chars in enumerate(CHARSETS):
        if f"characters {chars}." in prompt:
            instruction = charset_text(rng, d, d, 0.0, 15)
            return f"Instruction: {instruction}\nResponse: {charset_text(rng, d, d, 0.0, 15)}"
    return "I do not know this domain."


def demo_respond(prompt: str, rng: random.Random) -> str:
    """A scripted 'instruct model' for the demo capabilities: a fresh item of the described one.

    Capability c is described as "tasks of the capability {c}."
    """
    for cap in demo_suite.CAPABILITIES:
        if f"capability {cap}." in prompt:
            question, answer = demo_tasks.GENERATORS[cap](rng)
            return f"Instruction: {question}\nResponse: {answer}"
    return "I do not know this domain."


def purity(labels_n, true_n) -> float:
    """Fraction of examples whose cluster's majority true domain is their own."""
    labels_n, true_n = np.asarray(labels_n), np.asarray(true_n)
    return float(
        sum(np.bincount(true_n[labels_n == k]).max() for k in np.unique(labels_n)) / len(labels_n)
    )


def _example(record: dict, domain: str) -> Example:
    user, assistant = record["messages"]
    return Example(record["id"], domain, (("user", user["content"]),), assistant["content"])
