"""The synthetic demo suite: determinism, splits, correct answers, harmful conflicts, tokenizer."""

import collections
import filecmp
import json
import random
import re
import time
from pathlib import Path

import pytest

from ideal_jax.data import demo_suite, demo_tasks
from ideal_jax.data.domains import load_domains, load_reference
from ideal_jax.utils.errors import InputError

SMALL = {"arithmetic": 30, "reverse": 150, "sort": 60, "lookup": 40, "uppercase": 90}
# The table family (configs/demo.py's): 64 + 30 > 64 rows, so test and reference rows overlap.
TABLES = {"times": 500, "facts": 300, "translate": 200, "codes": 100, "cities": 40}
TABLES_HARMFUL = dict(TABLES, translate_wrong=90)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return out, demo_suite.build_demo_suite(out, seed=3, train_sizes=SMALL, n_test=20, n_ref=10)


@pytest.fixture(scope="module")
def table_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    paths = demo_suite.build_demo_suite(
        out, seed=3, train_sizes=TABLES_HARMFUL, n_test=200, n_ref=30
    )
    return out, paths


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.jsonl"))


@pytest.mark.parametrize("which", ["copy", "tables"])
def test_same_seed_same_files_other_seed_differs(suite, table_suite, which, tmp_path):
    root, _ = suite if which == "copy" else table_suite
    sizes, n_test, n_ref = (SMALL, 20, 10) if which == "copy" else (TABLES_HARMFUL, 200, 30)
    again = tmp_path / "again"
    demo_suite.build_demo_suite(again, seed=3, train_sizes=sizes, n_test=n_test, n_ref=n_ref)
    assert _files(root) == _files(again)
    for rel in _files(root):
        assert filecmp.cmp(root / rel, again / rel, shallow=False), rel
    other = tmp_path / "other"
    demo_suite.build_demo_suite(other, seed=4, train_sizes=sizes, n_test=n_test, n_ref=n_ref)
    assert not filecmp.cmp(root / "ref.jsonl", other / "ref.jsonl", shallow=False)
    for domain in sizes:  # another seed: another training order
        rel = Path("train") / f"{domain}.jsonl"
        assert not filecmp.cmp(root / rel, other / rel, shallow=False), rel
    if which == "tables":  # the facts themselves are the same for every seed
        for domain in sizes:
            assert _pairs(root / "train" / f"{domain}.jsonl") == _pairs(
                other / "train" / f"{domain}.jsonl"
            )


def _pairs(path: Path) -> set[tuple[str, str]]:
    pairs = set()
    for line in open(path):
        r = json.loads(line)
        pairs.add((r["messages"][0]["content"], r["messages"][1]["content"]))
    return pairs


def test_default_suite_is_fast_and_imbalanced(tmp_path):
    start = time.perf_counter()
    paths = demo_suite.build_demo_suite(tmp_path, seed=0)
    assert time.perf_counter() - start < 5.0
    sizes = demo_suite.DEFAULT_TRAIN_SIZES
    assert len(demo_suite.TABLE_CAPABILITIES) >= 5 and len(demo_suite.COPY_CAPABILITIES) >= 5
    assert max(sizes.values()) >= 5 * min(sizes.values())
    assert set(sizes) == set(demo_suite.TABLE_CAPABILITIES) | {"translate_wrong"}
    domains = load_domains(paths["train"])
    assert {d: len(v) for d, v in domains.items()} == sizes
    # test and reference items only for the family in use
    assert sorted(demo_suite.load_eval_items(tmp_path, "test")) == sorted(
        demo_suite.TABLE_CAPABILITIES
    )


def test_configs_demo_matches_the_default_mixture():
    from configs import demo

    assert dict(demo.get_config().data.demo_train_sizes) == demo_suite.DEFAULT_TRAIN_SIZES


def test_splits_are_disjoint_and_complete(suite):
    root, paths = suite
    train = load_domains(paths["train"])
    test = demo_suite.load_eval_items(root, "test")
    ref = demo_suite.load_eval_items(root, "ref")
    assert list(test) == list(demo_suite.COPY_CAPABILITIES) == list(ref)
    for cap in demo_suite.COPY_CAPABILITIES:
        assert len(train[cap]) == SMALL[cap] and len(test[cap]) == 20 and len(ref[cap]) == 10
        train_prompts = {ex.messages[-1][1] for ex in train[cap]}
        test_prompts = {item.prompt for item in test[cap]}
        ref_prompts = {item.prompt for item in ref[cap]}
        assert not train_prompts & test_prompts
        assert not train_prompts & ref_prompts
        assert not test_prompts & ref_prompts
    grouped = load_reference(paths["ref"])
    assert sorted(grouped) == sorted(demo_suite.COPY_CAPABILITIES)
    assert all(ex.capability == cap for cap, exs in grouped.items() for ex in exs)


def test_table_splits(table_suite):
    root, paths = table_suite
    train = load_domains(paths["train"])
    test = demo_suite.load_eval_items(root, "test")
    ref = demo_suite.load_eval_items(root, "ref")
    assert list(test) == list(demo_suite.TABLE_CAPABILITIES) == list(ref)
    for cap in demo_suite.TABLE_CAPABILITIES:
        rows = set(demo_suite.table(cap))
        assert len(rows) == demo_tasks.TABLE_SIZE == len({p for p, _ in rows})  # distinct keys
        train_rows = [(ex.messages[-1][1], ex.response) for ex in train[cap]]
        assert len(train_rows) == TABLES[cap] and set(train_rows) <= rows
        # reference (dev): 30 distinct rows; test (n_test >= 64 - 30): every other row
        ref_rows = {(i.prompt, i.answer) for i in ref[cap]}
        assert len(ref_rows) == len(ref[cap]) == 30 and ref_rows <= rows
        test_rows = {(i.prompt, i.answer) for i in test[cap]}
        assert test_rows == rows - ref_rows and len(test[cap]) == len(rows) - 30


def test_table_frequencies_are_graded():
    """Row i is FREQUENCY_RANGE ** (i / 63) times rarer than row 0, with exact counts."""
    for cap in demo_suite.TABLE_CAPABILITIES:
        rows = list(demo_suite.table(cap))
        suite_rows = demo_suite._table_splits(cap, 20_000, 64, 10, seed=0)[0]
        counts = collections.Counter(suite_rows)
        assert sum(counts.values()) == 20_000
        spread = demo_suite.FREQUENCY_RANGE[cap]
        weights = [spread ** (-i / 63) for i in range(64)]
        for row, w in zip(rows, weights):
            assert abs(counts[row] - 20_000 * w / sum(weights)) < 1.0
        assert counts[rows[0]] / counts[rows[-1]] == pytest.approx(spread, rel=0.1)
    # a small volume: only the frequent rows of a long-tailed table are seen at all
    seen = set(demo_suite._table_splits("facts", 100, 64, 10, seed=0)[0])
    assert 10 < len(seen) < 40 and set(demo_suite.table("facts")[:10]) <= seen


FORMATS = {  # the documented answer format of each invented table
    "facts": r"[a-z][a-z][a-z]",
    "translate": r"[bdfgklmnprstvz][aeiou][bdfgklmnprstvz][aeiou]",
    "codes": r"[A-Z][A-Z]",
    "cities": r"[BDFGKLMNPRSTVZ][aeiou][bdfgklmnprstvz]",
}


def _solve(capability: str, prompt: str) -> str:
    """An independent solver: every answer in the suite must be exactly right."""
    if capability == "times":
        a, b = prompt.split("*")
        assert 2 <= int(a) <= 9 and 2 <= int(b) <= 9
        return str(int(a) * int(b))
    if capability in FORMATS:  # invented facts: the fixed table is the ground truth
        return dict(demo_suite.table(capability))[prompt]
    if capability == "arithmetic":
        return str(eval(prompt.removeprefix("calc ")))  # only digits and +/- by construction
    if capability == "reverse":
        return prompt.removeprefix("reverse: ")[::-1]
    if capability == "sort":
        return " ".join(sorted(prompt.removeprefix("sort: ").split()))
    if capability == "lookup":
        table, key = prompt.split(" get ")
        return dict(pair.split("=") for pair in table.split())[key]
    return prompt.removeprefix("upper: ").upper()


def test_answers_are_correct(suite, table_suite):
    for root, paths in (suite, table_suite):
        for split in ("test", "ref"):
            for items in demo_suite.load_eval_items(root, split).values():
                for item in items:
                    assert demo_tasks.exact_match(_solve(item.capability, item.prompt), item.answer)
        for domain, exs in load_domains(paths["train"]).items():
            if domain in demo_suite.HARMFUL_DOMAINS:
                continue
            for ex in exs:
                assert demo_tasks.exact_match(_solve(domain, ex.messages[-1][1]), ex.response)


def test_invented_tables_have_their_format_and_one_answer_per_prompt():
    for cap, pattern in FORMATS.items():
        rows = demo_suite.table(cap)
        prefix = {"facts": "fact ", "translate": "fr ", "codes": "code ", "cities": "city "}[cap]
        for prompt, answer in rows:
            assert re.fullmatch(pattern, answer), (cap, answer)
            assert prompt.startswith(prefix) and len(prompt) == len(prefix) + 1
        assert len(set(a for _, a in rows)) > 32  # not a guessable handful of answers
        assert demo_suite.table(cap) == rows  # fixed


def test_harmful_domains_conflict(table_suite, tmp_path):
    """translate_wrong: translate's very prompts, each with one consistent wrong translation."""
    _, paths = table_suite
    right = dict(demo_suite.table("translate"))
    wrong = load_domains(paths["train"])["translate_wrong"]
    assert len(wrong) == TABLES_HARMFUL["translate_wrong"]
    answers: dict[str, set[str]] = collections.defaultdict(set)
    for ex in wrong:
        prompt = ex.messages[-1][1]
        assert prompt in right and ex.response != right[prompt]
        assert re.fullmatch(FORMATS["translate"], ex.response)  # same format, other answer
        answers[prompt].add(ex.response)
    assert all(len(a) == 1 for a in answers.values())  # consistent: a conflicting mapping
    assert len(answers) == demo_tasks.TABLE_SIZE  # 90 >= 64: every prompt of the table conflicts
    assert demo_suite.HARMFUL_DOMAINS["translate_wrong"] == "translate"
    # arithmetic_wrong: arithmetic's format, wrong answers, prompts disjoint from arithmetic's
    paths = demo_suite.build_demo_suite(
        tmp_path, seed=1, train_sizes=dict(SMALL, arithmetic_wrong=50), n_test=10, n_ref=5
    )
    domains = load_domains(paths["train"])
    arithmetic = {ex.messages[-1][1] for ex in domains["arithmetic"]}
    for ex in domains["arithmetic_wrong"]:
        prompt = ex.messages[-1][1]
        assert prompt not in arithmetic and ex.response != _solve("arithmetic", prompt)


def test_generate_items_and_families():
    rows = demo_suite.generate_items("codes", 64, seed=5)
    assert sorted(rows) == sorted(demo_suite.table("codes"))
    assert demo_suite.generate_items("codes", 10, seed=5) == demo_suite.generate_items(
        "codes", 10, seed=5
    )
    with pytest.raises(InputError, match="64 rows"):
        demo_suite.generate_items("codes", 65, seed=5)
    assert demo_suite.family("translate_wrong") == demo_suite.TABLE_CAPABILITIES
    assert demo_suite.family("arithmetic_wrong") == demo_suite.COPY_CAPABILITIES
    assert set(demo_suite.DOMAINS) == set(demo_tasks.GENERATORS)
    for cap in demo_suite.TABLE_CAPABILITIES:  # GENERATORS draw rows of the fixed table
        assert demo_tasks.GENERATORS[cap](random.Random(0)) in demo_suite.table(cap)


def test_exact_match_normalization():
    assert demo_tasks.exact_match(" 1 2  3\n", "1 2 3")
    assert not demo_tasks.exact_match("hello", "HELLO")
    assert not demo_tasks.exact_match("12", "1 2")


def test_tokenizer_round_trip_offline(suite, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, paths = suite
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.bos_token == "<bos>"
    assert len(tok) < 128
    items = [i for c in demo_suite.load_eval_items(root, "ref").values() for i in c]
    items += [
        demo_suite.EvalItem("", c, p, a)
        for c in demo_suite.TABLE_CAPABILITIES
        for p, a in demo_suite.table(c)
    ]
    for item in items:
        for text in (item.prompt, item.answer):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text)  # one token per character
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
        assert len(item.prompt) <= 40
    prompt = [{"role": "user", "content": "calc 1+2"}]
    gen = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "3"}], tokenize=False)
    assert gen == "<bos><|user|>calc 1+2<|assistant|>"
    assert full == gen + "3<eos>"
