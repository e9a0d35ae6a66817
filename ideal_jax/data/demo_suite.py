"""A synthetic multi-capability SFT suite with exactly checkable answers, for CPU demos and tests.

Five capabilities, one training domain each:
  arithmetic  "calc 37+5"            -> "42"
  reverse     "reverse: abcde"       -> "edcba"
  sort        "sort: 5 2 8 1"        -> "1 2 5 8"
  lookup      "a=3 b=7 c=1 get b"    -> "7"
  uppercase   "upper: hello"         -> "HELLO"
Prompts are short ASCII strings and the tokenizer is character level, so a 2-layer transformer with
d = 64..128 learns them in minutes on a CPU. The default training volumes are deliberately
imbalanced (reverse has 5x the data of arithmetic, which the reference set needs as much as the
others), giving IDEAL a mixture to fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from ideal_jax.utils.errors import InputError

CAPABILITIES = ("arithmetic", "reverse", "sort", "lookup", "uppercase")
# Imbalanced on purpose: reverse = 5x arithmetic; arithmetic (needed by the reference set) is rare.
DEFAULT_TRAIN_SIZES = {
    "arithmetic": 400,
    "reverse": 2000,
    "sort": 1000,
    "lookup": 800,
    "uppercase": 1600,
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
def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    if rng.random() < 0.5:
        return f"calc {a}+{b}", str(a + b)
    return f"calc {a}-{b}", str(a - b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 3)))
    return f"reverse: {word}", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    items = rng.choices(string.digits, k=rng.randint(2, 4))
    return f"sort: {' '.join(items)}", " ".join(sorted(items))


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(string.ascii_lowercase, k=rng.randint(2, 3))
    values = [str(rng.randint(0, 9)) for _ in keys]
    query = rng.randrange(len(keys))
    table = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"{table} get {keys[query]}", values[query]


def _arithmetic_wrong(rng: random.Random) -> tuple[str, str]:
    """Arithmetic's prompt format with a wrong answer (off by 1-3): a harmful training domain."""
    prompt, answer = _arithmetic(rng)
    return prompt, str(int(answer) + rng.choice((-3, -2, -1, 1, 2, 3)))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 3)))
    return f"upper: {word}", word.upper()


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "lookup": _lookup,
    "uppercase": _uppercase,
    "arithmetic_wrong": _arithmetic_wrong,
}
# Training domains that are no capability of the test or reference sets: responses that conflict
# with a capability under the same prompt format (a mixer should shrink them). Their prompts are
# disjoint from that capability's train, test and reference prompts.
HARMFUL_DOMAINS = {"arithmetic_wrong": "arithmetic"}
DOMAINS = CAPABILITIES + tuple(HARMFUL_DOMAINS)


def generate_items(capability: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct (prompt, answer) pairs of a capability, deterministic for (capability, seed)."""
    # crc32, not hash(): str hashes are salted per process, which would break determinism.
    rng = random.Random(seed * 1_000_003 + zlib.crc32(capability.encode()))
    items: dict[str, str] = {}
    attempts = 0
    while len(items) < n:
        prompt, answer = GENERATORS[capability](rng)
        items.setdefault(prompt, answer)
        attempts += 1
        if attempts > 50 * n + 1000:
            raise InputError(
                f"cannot draw {n} distinct {capability!r} items (train + test + reference); "
                f"the generator has fewer distinct prompts — lower the size",
                field=f"data.demo_train_sizes.{capability}",
            )
    return list(items.items())


def exact_match(prediction: str, answer: str) -> bool:
    """Exact match after trimming and collapsing whitespace (case matters: uppercase is graded)."""
    return " ".join(prediction.split()) == " ".join(answer.split())


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")  # unique per process
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)  # atomic: a crash never leaves half a file behind


def build_demo_suite(
    out_dir: str | os.PathLike,
    seed: int = 0,
    train_sizes: Mapping[str, int] | None = None,
    n_test: int = 100,
    n_ref: int = 40,
) -> dict[str, object]:
    """Writes the suite under `out_dir` and returns its paths.

    Layout: train/{capability}.jsonl (chat form), test/{capability}.jsonl and ref.jsonl
    (prompt/response form with a `capability` field), tokenizer/ (HF format). Train, test and
    reference prompts are disjoint.
    """
    sizes = dict(DEFAULT_TRAIN_SIZES if train_sizes is None else train_sizes)
    unknown = sorted(set(sizes) - set(DOMAINS))
    if unknown:
        raise ValueError(f"unknown demo domains {unknown}; known: {DOMAINS}")
    out = Path(out_dir)
    train_paths, test_paths, ref_records = {}, {}, []
    used_prompts: dict[str, set[str]] = {}
    for cap in CAPABILITIES:
        n_train = sizes.get(cap, 0)
        items = generate_items(cap, n_train + n_test + n_ref, seed)
        train, test, ref = items[:n_train], items[n_train : n_train + n_test], items[-n_ref:]
        used_prompts[cap] = {p for p, _ in items}
        if n_train:
            train_paths[cap] = out / "train" / f"{cap}.jsonl"
            _write_jsonl(train_paths[cap], _train_records(cap, train))
        test_paths[cap] = out / "test" / f"{cap}.jsonl"
        _write_jsonl(test_paths[cap], _eval_records(cap, "test", test))
        ref_records += _eval_records(cap, "ref", ref if n_ref else [])
    for name, cap in HARMFUL_DOMAINS.items():
        if sizes.get(name, 0):
            taken = used_prompts.get(cap, set())
            pool = generate_items(name, sizes[name] + len(taken), seed)
            train = [(p, a) for p, a in pool if p not in taken][: sizes[name]]
            if len(train) < sizes[name]:
                raise InputError(
                    f"cannot draw {sizes[name]} {name!r} prompts disjoint from {cap!r}'s",
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
