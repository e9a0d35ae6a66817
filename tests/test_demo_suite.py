"""The synthetic demo suite: determinism, disjoint splits, correct answers, tokenizer round trip."""

import filecmp
import time
from pathlib import Path

import pytest

from ideal_jax.data import demo_suite
from ideal_jax.data.records import load_domains, load_reference

SMALL = {"arithmetic": 30, "reverse": 150, "sort": 60, "lookup": 40, "uppercase": 90}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return out, demo_suite.build_demo_suite(out, seed=3, train_sizes=SMALL, n_test=20, n_ref=10)


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.jsonl"))


def test_same_seed_same_files_other_seed_differs(suite, tmp_path):
    root, _ = suite
    again = tmp_path / "again"
    demo_suite.build_demo_suite(again, seed=3, train_sizes=SMALL, n_test=20, n_ref=10)
    assert _files(root) == _files(again)
    for rel in _files(root):
        assert filecmp.cmp(root / rel, again / rel, shallow=False), rel
    other = tmp_path / "other"
    demo_suite.build_demo_suite(other, seed=4, train_sizes=SMALL, n_test=20, n_ref=10)
    assert not filecmp.cmp(root / "ref.jsonl", other / "ref.jsonl", shallow=False)


def test_default_suite_is_fast_and_imbalanced(tmp_path):
    start = time.perf_counter()
    paths = demo_suite.build_demo_suite(tmp_path, seed=0)
    assert time.perf_counter() - start < 5.0
    sizes = demo_suite.DEFAULT_TRAIN_SIZES
    assert len(demo_suite.CAPABILITIES) >= 5
    assert max(sizes.values()) >= 5 * min(sizes.values())
    domains = load_domains(paths["train"])
    assert {d: len(v) for d, v in domains.items()} == sizes


def test_splits_are_disjoint_and_complete(suite):
    root, paths = suite
    train = load_domains(paths["train"])
    test = demo_suite.load_eval_items(root, "test")
    ref = demo_suite.load_eval_items(root, "ref")
    assert list(test) == list(demo_suite.CAPABILITIES) == list(ref)
    for cap in demo_suite.CAPABILITIES:
        assert len(train[cap]) == SMALL[cap] and len(test[cap]) == 20 and len(ref[cap]) == 10
        train_prompts = {ex.messages[-1][1] for ex in train[cap]}
        test_prompts = {item.prompt for item in test[cap]}
        ref_prompts = {item.prompt for item in ref[cap]}
        assert not train_prompts & test_prompts
        assert not train_prompts & ref_prompts
        assert not test_prompts & ref_prompts
    grouped = load_reference(paths["ref"])
    assert sorted(grouped) == sorted(demo_suite.CAPABILITIES)
    assert all(ex.capability == cap for cap, exs in grouped.items() for ex in exs)


def _solve(capability: str, prompt: str) -> str:
    """An independent solver: every answer in the suite must be exactly right."""
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


def test_answers_are_correct(suite):
    root, _ = suite
    for items in demo_suite.load_eval_items(root, "test").values():
        for item in items:
            assert demo_suite.exact_match(_solve(item.capability, item.prompt), item.answer)


def test_exact_match_normalization():
    assert demo_suite.exact_match(" 1 2  3\n", "1 2 3")
    assert not demo_suite.exact_match("hello", "HELLO")
    assert not demo_suite.exact_match("12", "1 2")


def test_tokenizer_round_trip_offline(suite, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, paths = suite
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.bos_token == "<bos>"
    assert len(tok) < 128
    for items in demo_suite.load_eval_items(root, "ref").values():
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
