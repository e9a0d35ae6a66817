"""Hostile user data (tests/hostile_data.py): every case is read and tokenized, or refused with
an InputError naming the file, the record and the field; never a traceback from inside a parser,
the tokenizer or the plot."""

import json
import os

import numpy as np
import pytest
from hostile_data import ODD_NAMES, ODD_TEXTS, data_cases, grouped_cases

from ideal_jax import summary
from ideal_jax.data import formatting, records
from ideal_jax.data import mixture as mixture_lib
from ideal_jax.data.demo_suite import build_tokenizer
from ideal_jax.data.domains import load_domains, load_reference
from ideal_jax.utils.errors import InputError

CASES = data_cases(seed=0)
GROUPED = grouped_cases()


@pytest.fixture(scope="module")
def tokenizers():
    plain = build_tokenizer()
    plain.chat_template = None
    return {"chat": build_tokenizer(), "plain": plain}


def _read_and_tokenize(path, tokenizers):
    domains = load_domains({"d": path})
    for tok in tokenizers.values():
        kept, _ = formatting.tokenize_examples(domains["d"], tok, max_len=64)
        assert kept
    return domains


def test_the_generator_has_many_cases_of_both_kinds():
    refused = [c for c in CASES if c.refused is not None]
    assert len(CASES) >= 100 and len(refused) >= 30 and len(CASES) - len(refused) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_domain_file(tmp_path, tokenizers, case):
    path = tmp_path / "domain.jsonl"
    path.write_bytes(case.content)
    if case.refused is None:
        _read_and_tokenize(str(path), tokenizers)
        return
    record, field = case.refused
    with pytest.raises(InputError) as info:
        _read_and_tokenize(str(path), tokenizers)
    message = str(info.value)
    assert info.value.path == str(path) and str(path) in message, message
    assert info.value.record == record and record in message, message
    if field is not None:
        assert info.value.field == field, message


@pytest.mark.parametrize("label", sorted(ODD_TEXTS))
def test_odd_text_survives_the_round_trip_to_final_mixture(tmp_path, tokenizers, label):
    """Read → tokenize → final_mixture.jsonl → read back: the text is unchanged."""
    text = ODD_TEXTS[label]
    src = tmp_path / "d.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "prompt": text, "response": text}) + "\n" for i in range(3)
        )
    )
    domains = _read_and_tokenize(str(src), tokenizers)
    mix = mixture_lib.build_mixture({"d": [ex.id for ex in domains["d"]]}, None, seed=0)
    out = tmp_path / "final_mixture.jsonl"
    mixture_lib.export_jsonl(mix, domains, out)
    back = load_domains(str(out))
    assert {ex.response for ex in back["d"]} == {text}


@pytest.mark.parametrize("name, content, refused", GROUPED, ids=[g[0] for g in GROUPED])
def test_hostile_domain_names_in_a_grouped_source(tmp_path, name, content, refused):
    path = tmp_path / "all.jsonl"
    path.write_bytes(content)
    if refused is None:
        domains = load_domains(str(path))
        assert len(domains) == 2
        return
    with pytest.raises(InputError) as info:
        load_domains(str(path))
    assert (info.value.path, info.value.record, info.value.field) == (str(path), *refused)


def _summary_rows(names):
    rows = []
    for k in range(2):
        rows.append(
            {
                "round": k,
                "mixture": {n: {"source": 3, "target": 3 + k} for n in names},
                "eval": {"tasks": {}, "reference_loss": {n: 1.0 for n in names}},
                **(
                    {
                        "alpha": {n: float(i) for i, n in enumerate(names)},
                        "alpha_stderr": {n: 0.1 for n in names},
                    }
                    if k == 0
                    else {}
                ),
            }
        )
    return rows


@pytest.mark.parametrize("name", ODD_NAMES, ids=[repr(n)[:20] for n in ODD_NAMES])
def test_odd_domain_name_in_summary_plot_and_table(tmp_path, name):
    """summary.png and the table take any name (a $ in a label is mathtext to matplotlib: "$^$"
    stopped the plot, and so final_mixture.jsonl, which is written after it)."""
    cfg_names = [name, "plain"]
    rows = _summary_rows(cfg_names)
    result = {"rounds": rows, "scores": [{name: 0.5, "average": 0.5}] * 2}
    summary.plot_rounds(result, str(tmp_path / "summary.png"))
    assert os.path.getsize(tmp_path / "summary.png") > 0
    table = summary.format_table(result["scores"])
    assert "D1" in table


def test_table_without_eval_tasks_shows_reference_losses():
    """A run on the user's own data without eval tasks has no scores ([{}, {}]): the table printed
    at the end raised IndexError after every artifact was written (exit 1)."""
    losses = [{"math": 2.5, "all": 2.5}, {"math": 2.25, "all": 2.25}]
    table = summary.format_table([{}, {}], losses)
    assert "no evaluation scores" in table and "math" in table and "2.2500" in table
    assert "no evaluation scores" in summary.format_table([{}], None)
    assert "no evaluation scores" in summary.format_table([], None)


def test_seed_aggregate_without_eval_tasks_formats():
    agg = summary.aggregate_seeds([{"scores": [{}, {}]}, {"scores": [{}, {}]}])
    assert "no evaluation scores" in summary.format_table(agg["scores"])


def test_capability_named_all_beside_others_is_refused(tmp_path):
    ref = tmp_path / "ref.jsonl"
    ref.write_text(
        json.dumps({"capability": "all", "prompt": "q", "response": "a"})
        + "\n"
        + json.dumps({"capability": "math", "prompt": "q2", "response": "a2"})
        + "\n"
    )
    with pytest.raises(InputError, match="reserved") as info:
        load_reference(str(ref))
    assert info.value.path == str(ref) and info.value.field == "capability"
    only_all = tmp_path / "only.jsonl"
    only_all.write_text(json.dumps({"capability": "all", "prompt": "q", "response": "a"}) + "\n")
    assert list(load_reference(str(only_all))) == ["all"]


def test_a_template_error_names_the_record(tmp_path):
    """A chat template that raises on one conversation (e.g. roles must alternate): the record is
    named, not a jinja traceback from inside the batched call."""
    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    path = tmp_path / "d.jsonl"
    lines = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    lines[3]["prompt"] = "forbidden"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    examples = load_domains({"d": str(path)})["d"]
    with pytest.raises(InputError, match="roles must alternate") as info:
        formatting.tokenize_examples(examples, tok, max_len=64)
    assert (info.value.path, info.value.record, info.value.field) == (
        str(path),
        "line 4",
        "messages",
    )


def test_a_batch_failure_no_single_example_reproduces_stays_a_traceback():
    calls = []

    def flaky(exs):
        calls.append(len(exs))
        if len(exs) > 1:
            raise RuntimeError("a bug, not the data")
        return [np.zeros(1)] * len(exs)

    exs = [records.Example(f"i{i}", "d", (("user", "q"),), "a") for i in range(3)]
    with pytest.raises(RuntimeError, match="a bug"):
        formatting._per_example(exs, flaky, "x")
