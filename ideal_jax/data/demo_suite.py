"""A synthetic multi-capability SFT suite with exactly checkable answers, for CPU demos and tests.

Two families of capabilities, one training domain each.

The demo's family (`TABLE_CAPABILITIES`, configs/demo.py): each capability is a fixed, finite table
of 64 (prompt, answer) rows, the same for every seed, keyed by one character so that a row is one
key token to memorise:
  times      "7*8"      -> "56"      the multiplication table of 2..9
  facts      "fact A"   -> "qzv"     an invented three-letter fact for each of 64 keys
  translate  "fr t"     -> "kiza"    an invented translation for each key
  codes      "code #"   -> "ZC"      an invented two-letter code for each key
  cities     "city e"   -> "Nag"     an invented city for each key
Training items are rows of the table, on purpose: exact-match accuracy is the share of the table the
model holds. Each table's rows are split, per seed, into a dev part (the reference set: every choice
a method makes is made on it) and a disjoint test part (scores only). A training domain of v
examples shows the rows with graded, exact frequencies (row i is FREQUENCY_RANGE ** (i / 63) times
rarer than row 0), so frequent rows are learnt at small volumes and rare ones only at large volumes:
accuracy grows smoothly with v (about +10% of the rows per doubling for the long-tailed tables),
with no phase transition of the kind an algorithm (copying, sorting) has. The times table is drilled
almost evenly (range 10) and saturates.
Dev (reference) rows are a seeded sample of n_ref rows; test rows are up to n_test of the others
(n_test >= 64 - n_ref: all of them). A domain's source file may hold `pool_factor` times its D0
share (`train_sizes`), drawn with the same graded frequencies, so that a growing domain can draw
rows D0 never showed (data.upsample = fresh_first). Answers are high-entropy (no answer is
guessable), which keeps the seed spread low: docs/demo_results.md.

The harmful domain `translate_wrong` uses translate's very prompts ("fr t") with a consistent,
conflicting table (every key gets the next row's translation), every row equally often: training
on it raises the reference loss on translate directly, and a good mixer must shrink it.

The older family (`COPY_CAPABILITIES`: configs/tiny.py, the DaaR demo) needs an algorithm:
  arithmetic  "calc 37+5"            -> "42"
  reverse     "reverse: abcde"       -> "edcba"
  sort        "sort: 5 2 8 1"        -> "1 2 5 8"
  lookup      "a=3 b=7 c=1 get b"    -> "7"
  uppercase   "upper: hello"         -> "HELLO"
Their train, test and reference prompts are disjoint. The copy tasks learn through phase
transitions (a tiny model either gets copying or it does not), which made the seed spread of the
old demo too large to see a mixture's effect (docs/demo_results.md). Its harmful domain,
arithmetic_wrong, answers off by 1-3.

Prompts are short ASCII strings and the tokenizer is character level, so a 2-layer transformer with
d = 64..128 learns them in minutes on a CPU. A suite is built for the families whose domains appear
in `train_sizes`: test and reference items are written for every capability of those families.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import zlib
from collections.abc import Mapping
from pathlib import Path

from ideal_jax.data.demo_tasks import (
    CAPABILITIES,
    COPY_CAPABILITIES,
    DOMAINS,
    FREQUENCY_RANGE,
    HARMFUL_DOMAINS,
    TABLE_CAPABILITIES,
    TABLE_HARMFUL,
    generate_items,
    table,
)
from ideal_jax.utils.atomic import atomic_file
from ideal_jax.utils.errors import InputError

# The demo's starting mixture (configs/demo.py holds the same): wrong in three known ways.
DEFAULT_TRAIN_SIZES = {
    "times": 2600,  # oversized: saturated long before this
    "facts": 1300,
    "translate": 1100,
    "codes": 1100,
    "cities": 300,  # starved: the reference set needs it as much as the others
    "translate_wrong": 600,  # harmful: translate's prompts, conflicting answers
}
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# The prompt with generation prompt is a prefix of the full conversation (formatting.py checks it).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Every printable ASCII character and newline: no input can hit <unk> in practice.
ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One held-out (test or reference) item with its exact answer."""

    id: str
    capability: str
    prompt: str
    answer: str


# Sizes are kept small on purpose: the demo must learn every capability in about a minute of CPU
# training with a tiny model, so that changes in the mixture show up in the scores.
def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` over `ALPHABET`, specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ROLE_TOKENS)}
    for ch in ALPHABET:
        vocab[ch] = len(vocab)
    # A BPE model with no merges is exactly character level, and twice as fast as a WordLevel model
    # behind a one-character Split pre-tokenizer. Fuse joins the characters back without spaces.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS + ROLE_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_file(path) as f:  # a crash never leaves half a file behind
        for record in records:
            f.write(json.dumps(record) + "\n")


def family(domain: str) -> tuple[str, ...]:
    """The capabilities of the family a domain (capability or harmful domain) belongs to."""
    cap = HARMFUL_DOMAINS.get(domain, domain)
    if cap in TABLE_CAPABILITIES:
        return TABLE_CAPABILITIES
    if cap in COPY_CAPABILITIES:
        return COPY_CAPABILITIES
    raise ValueError(f"unknown demo domain {domain!r}; known: {DOMAINS}")


def _cycle(rows: list[tuple[str, str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` rows: passes over `rows`, each in a fresh random order (every row floor/ceil(n/len))."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        order = list(rows)
        rng.shuffle(order)
        out += order
    return out[:n]


def _graded(
    rows: list[tuple[str, str]],
    n: int,
    spread: float,
    rng: random.Random,
    every_row: bool = False,
) -> list[tuple[str, str]]:
    """`n` rows, row i `spread ** (i / (len(rows) - 1))` times rarer than row 0.

    Exact counts (largest remainder), then shuffled: frequent rows are learnt at small volumes,
    rare ones only at large volumes, so the share of the table learnt grows smoothly with n.
    every_row (a source pool, n >= len(rows)): each row at least once, the extra taken from the
    most frequent rows.
    """
    weights = [spread ** (-i / (len(rows) - 1)) for i in range(len(rows))]
    quotas = [n * w / sum(weights) for w in weights]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(rows)), key=lambda i: counts[i] - quotas[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    if every_row and n >= len(rows):
        counts = [max(c, 1) for c in counts]
        while sum(counts) > n:
            counts[counts.index(max(counts))] -= 1
    out = [row for row, c in zip(rows, counts) for _ in range(c)]
    rng.shuffle(out)
    return out


def _table_splits(
    cap: str, n_train: int, n_test: int, n_ref: int, seed: int, every_row: bool = False
):
    """Train (graded frequencies), test and reference (dev) rows of a table capability; the test
    and dev rows are disjoint: dev takes n_ref rows, test up to n_test of the remaining ones."""
    rows = list(table(cap))
    if not 0 <= n_ref < len(rows):
        raise InputError(
            f"{n_ref} dev (reference) rows of a {len(rows)}-row table leave no test row",
            field="data.demo_n_ref",
        )
    rng = random.Random(seed * 1_000_003 + zlib.crc32(f"eval:{cap}".encode()))
    order = rng.sample(rows, len(rows))
    ref = order[len(rows) - n_ref :] if n_ref else []
    test = order[: min(n_test, len(rows) - n_ref)]
    train_rng = random.Random(seed * 1_000_003 + zlib.crc32(f"train:{cap}".encode()))
    return _graded(rows, n_train, FREQUENCY_RANGE[cap], train_rng, every_row), test, ref


def build_demo_suite(
    out_dir: str | os.PathLike,
    seed: int = 0,
    train_sizes: Mapping[str, int] | None = None,
    n_test: int = 100,
    n_ref: int = 40,
    pool_factor: int = 1,
) -> dict[str, object]:
    """Writes the suite under `out_dir` and returns its paths.

    Layout: train/{domain}.jsonl (chat form), test/{capability}.jsonl and ref.jsonl
    (prompt/response form with a `capability` field), tokenizer/ (HF format). Test and reference
    items are written for every capability of the families in `train_sizes` (module docstring):
    copy capabilities have disjoint train, test and reference prompts; table capabilities draw
    all three from their table (test and reference rows disjoint). Each training file holds
    `pool_factor` × the domain's size in `train_sizes` (its D0 share).
    """
    if int(pool_factor) < 1:
        raise InputError(
            f"must be an integer >= 1, got {pool_factor}", field="data.demo_pool_factor"
        )
    sizes = dict(DEFAULT_TRAIN_SIZES if train_sizes is None else train_sizes)
    unknown = sorted(set(sizes) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown demo domains {unknown}; known: {DOMAINS}")
    families = {family(d) for d in sizes} or {TABLE_CAPABILITIES}
    caps = [c for c in CAPABILITIES if any(c in f for f in families)]
    out = Path(out_dir)
    train_paths, test_paths, ref_records = {}, {}, []
    used_prompts: dict[str, set[str]] = {}
    for cap in caps:
        n_train = sizes.get(cap, 0) * int(pool_factor)
        if cap in TABLE_CAPABILITIES:
            train, test, ref = _table_splits(
                cap, n_train, n_test, n_ref, seed, every_row=int(pool_factor) > 1
            )
        else:
            items = generate_items(cap, n_train + n_test + n_ref, seed)
            train, test = items[:n_train], items[n_train : n_train + n_test]
            ref = items[len(items) - n_ref :] if n_ref else []
            used_prompts[cap] = {p for p, _ in items}
        if n_train:
            train_paths[cap] = out / "train" / f"{cap}.jsonl"
            _write_jsonl(train_paths[cap], _train_records(cap, train))
        test_paths[cap] = out / "test" / f"{cap}.jsonl"
        _write_jsonl(test_paths[cap], _eval_records(cap, "test", test))
        ref_records += _eval_records(cap, "ref", ref)
    for name, cap in HARMFUL_DOMAINS.items():
        if not sizes.get(name, 0):
            continue
        if name in TABLE_HARMFUL:  # the capability's own prompts, conflicting answers
            rng = random.Random(seed * 1_000_003 + zlib.crc32(f"train:{name}".encode()))
            train = _cycle(list(table(name)), sizes[name] * int(pool_factor), rng)
        else:  # prompts disjoint from the capability's
            taken = used_prompts.get(cap, set())
            wanted = sizes[name] * int(pool_factor)
            pool = generate_items(name, wanted + len(taken), seed)
            train = [(p, a) for p, a in pool if p not in taken][:wanted]
            if len(train) < wanted:
                raise InputError(
                    f"cannot draw {wanted} {name!r} prompts disjoint from {cap!r}'s",
                    field=f"data.demo_train_sizes.{name}",
                )
        train_paths[name] = out / "train" / f"{name}.jsonl"
        _write_jsonl(train_paths[name], _train_records(name, train))
    ref_path = out / "ref.jsonl"
    _write_jsonl(ref_path, ref_records)
    tokenizer_dir = out / "tokenizer"
    build_tokenizer().save_pretrained(os.fspath(tokenizer_dir))
    return {
        "train": {k: os.fspath(v) for k, v in train_paths.items()},
        "test": {k: os.fspath(v) for k, v in test_paths.items()},
        "ref": os.fspath(ref_path),
        "tokenizer": os.fspath(tokenizer_dir),
    }


def _train_records(domain: str, items: list[tuple[str, str]]) -> list[dict]:
    return [
        {
            "id": f"{domain}:{i}",
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
        }
        for i, (p, a) in enumerate(items)
    ]


def _eval_records(cap: str, split: str, items: list[tuple[str, str]]) -> list[dict]:
    return [
        {"id": f"{split}:{cap}:{i}", "capability": cap, "prompt": p, "response": a}
        for i, (p, a) in enumerate(items)
    ]


def load_eval_items(suite_dir: str | os.PathLike, split: str = "test") -> dict[str, list[EvalItem]]:
    """Test (`split="test"`) or reference (`split="ref"`) items per capability, with answers."""
    if split not in ("test", "ref"):
        raise ValueError(f"split must be 'test' or 'ref', got {split!r}")
    root = Path(suite_dir)
    paths = sorted((root / "test").glob("*.jsonl")) if split == "test" else [root / "ref.jsonl"]
    result: dict[str, list[EvalItem]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                item = EvalItem(r["id"], r["capability"], r["prompt"], r["response"])
                result.setdefault(item.capability, []).append(item)
    return {cap: result[cap] for cap in CAPABILITIES if cap in result}
