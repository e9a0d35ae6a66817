"""The demo suite's capabilities as (prompt, answer) generators: the fact-table family the demo
uses (fixed 64-row tables, `table`) and the older copy-task family, the harmful domains that
conflict with them, and exact-match scoring. ideal_jax/data/demo_suite.py writes suites from them;
its docstring describes both families.
"""

from __future__ import annotations

import functools
import random
import string
import zlib
from collections.abc import Callable

from ideal_jax.utils.errors import InputError

TABLE_CAPABILITIES = ("times", "facts", "translate", "codes", "cities")
COPY_CAPABILITIES = ("arithmetic", "reverse", "sort", "lookup", "uppercase")
CAPABILITIES = TABLE_CAPABILITIES + COPY_CAPABILITIES
TABLE_SIZE = 64
# How much more often a table domain shows its most frequent row than its rarest one: the times
# table is drilled almost evenly (it saturates); the invented tables are long-tailed (row i of 64 is
# 1000 ** (i / 63) times rarer than row 0, so each doubling of volume reaches ~10% more rows).
FREQUENCY_RANGE = {
    "times": 10.0,
    "facts": 1000.0,
    "translate": 1000.0,
    "codes": 1000.0,
    "cities": 1000.0,
}


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


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_KEYS = string.ascii_letters + string.digits + "#$"


def _syllables(n: int) -> list[str]:
    """Every consonant-vowel(-consonant...) word of `n` letters, in a fixed order."""
    words = [""]
    for i in range(n):
        words = [w + c for w in words for c in (_CONSONANTS if i % 2 == 0 else _VOWELS)]
    return words


@functools.cache
def table(domain: str) -> tuple[tuple[str, str], ...]:
    """The fixed (prompt, answer) table of a table capability or of its harmful domain.

    The same for every seed (a seed draws training order, test and reference rows, not the facts).
    """
    if domain in HARMFUL_DOMAINS and HARMFUL_DOMAINS[domain] in TABLE_CAPABILITIES:
        # The same prompts, each answered with the next row's answer: a consistent conflicting
        # mapping (answers are distinct across rows, so every one of them is wrong).
        rows = table(HARMFUL_DOMAINS[domain])
        return tuple((p, rows[(i + 1) % len(rows)][1]) for i, (p, _) in enumerate(rows))
    if domain not in TABLE_CAPABILITIES:
        raise ValueError(f"{domain!r} is no table capability; known: {TABLE_CAPABILITIES}")
    rng = random.Random(zlib.crc32(f"table:{domain}".encode()))
    if domain == "times":
        return tuple((f"{a}*{b}", str(a * b)) for a in range(2, 10) for b in range(2, 10))
    keys = rng.sample(_KEYS, TABLE_SIZE)  # one character: a row is one key token
    if domain == "facts":
        # letters, not digits: digit answers shared the times table's outputs and were noisier
        values = ["".join(rng.choices(string.ascii_lowercase, k=3)) for _ in keys]
        return tuple((f"fact {k}", v) for k, v in zip(keys, values))
    if domain == "translate":
        values = rng.sample(_syllables(4), TABLE_SIZE)  # distinct: see translate_wrong
        return tuple((f"fr {k}", v) for k, v in zip(keys, values))
    if domain == "codes":
        values = ["".join(rng.choices(string.ascii_uppercase, k=2)) for _ in keys]
        return tuple((f"code {k}", v) for k, v in zip(keys, values))
    values = [rng.choice(_syllables(3)).capitalize() for _ in keys]  # cities
    return tuple((f"city {k}", v) for k, v in zip(keys, values))


def _table_row(domain: str, rng: random.Random) -> tuple[str, str]:
    return rng.choice(table(domain))


def _translate_wrong(rng: random.Random) -> tuple[str, str]:
    return _table_row("translate_wrong", rng)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    **{cap: functools.partial(_table_row, cap) for cap in TABLE_CAPABILITIES},
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "lookup": _lookup,
    "uppercase": _uppercase,
    "arithmetic_wrong": _arithmetic_wrong,
    "translate_wrong": _translate_wrong,
}
# Training domains that are no capability of the test or reference sets: responses that conflict
# with a capability under the same prompt format (a mixer should shrink them). translate_wrong uses
# translate's very prompts; arithmetic_wrong's prompts are disjoint from arithmetic's train, test
# and reference prompts.
HARMFUL_DOMAINS = {"translate_wrong": "translate", "arithmetic_wrong": "arithmetic"}
DOMAINS = CAPABILITIES + tuple(HARMFUL_DOMAINS)
TABLE_HARMFUL = {d for d, cap in HARMFUL_DOMAINS.items() if cap in TABLE_CAPABILITIES}


def generate_items(capability: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` distinct (prompt, answer) pairs of a capability, deterministic for (capability, seed).

    For a table capability: `n` distinct rows of its table, in a seeded random order.
    """
    # crc32, not hash(): str hashes are salted per process, which would break determinism.
    rng = random.Random(seed * 1_000_003 + zlib.crc32(capability.encode()))
    if capability in TABLE_CAPABILITIES or capability in TABLE_HARMFUL:
        rows = table(capability)
        if n > len(rows):
            raise InputError(
                f"cannot draw {n} distinct {capability!r} items: its table has {len(rows)} rows",
                field=f"data.demo_train_sizes.{capability}",
            )
        return rng.sample(rows, n)
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
