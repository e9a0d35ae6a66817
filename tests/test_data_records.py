"""Loading and normalizing records: every accepted form, grouping, and errors for bad input."""

import json

import pytest

from ideal_jax.data.domains import load_domains, load_reference
from ideal_jax.data.records import Example, normalize_record
from ideal_jax.utils.errors import InputError

CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}
ALPACA = {"instruction": "Add.", "input": "2 2", "output": "4"}
PROMPT_RESPONSE = {"prompt": "2+2?", "response": "4"}


def _write_jsonl(path, records, raw_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def _normalize(record, **kwargs):
    return normalize_record(
        record, domain="d", index=5, path="f.jsonl", location="line 6", **kwargs
    )


def test_record_forms_normalize():
    chat = _normalize(CHAT)
    assert chat.messages == (
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "2+2?"),
    )
    assert chat.response == "4" and chat.id == "d:5" and chat.domain == "d"
    alpaca = _normalize(ALPACA)
    assert alpaca.messages == (("user", "Add.\n\n2 2"),) and alpaca.response == "4"
    no_input = _normalize({"instruction": "Say hi.", "output": "hi"})
    assert no_input.messages == (("user", "Say hi."),)
    plain = _normalize({**PROMPT_RESPONSE, "id": 17, "capability": "math"})
    assert plain == Example("17", "d", (("user", "2+2?"),), "4", "math", "f.jsonl")
    assert plain.chat_messages()[-1] == {"role": "assistant", "content": "4"}


def test_field_mapping():
    ex = _normalize(
        {"question": "q?", "answer": "a"}, field_map={"prompt": "question", "response": "answer"}
    )
    assert ex.messages == (("user", "q?"),) and ex.response == "a"
    with pytest.raises(InputError, match="'answer'"):
        _normalize({"question": "q?"}, field_map={"prompt": "question", "response": "answer"})


def test_one_file_per_domain_and_ids(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [CHAT, ALPACA])
    b = _write_jsonl(tmp_path / "b.jsonl", [{**PROMPT_RESPONSE, "id": "x1"}])
    domains = load_domains({"b": b, "a": a}, domain_names=["a", "b"])
    assert list(domains) == ["a", "b"]
    assert [ex.id for ex in domains["a"]] == ["a:0", "a:1"]
    assert domains["b"][0].id == "x1" and domains["b"][0].source == str(b)
    with pytest.raises(InputError, match="unknown domain names \\['c'\\]"):
        load_domains({"a": a}, domain_names=["a", "c"])


def test_single_source_with_domain_field(tmp_path):
    records = [{**PROMPT_RESPONSE, "domain": d} for d in ["m", "c", "m"]]
    path = _write_jsonl(tmp_path / "all.jsonl", records)
    domains = load_domains(path)
    assert {d: [ex.id for ex in v] for d, v in domains.items()} == {
        "c": ["c:0"],
        "m": ["m:0", "m:1"],
    }
    with pytest.raises(InputError, match="line 2.*'domain'.*unknown domain 'c'"):
        load_domains(path, domain_names=["m"])
    with pytest.raises(InputError, match="domain 'x' is empty"):
        load_domains(path, domain_names=["m", "c", "x"])
    missing = _write_jsonl(tmp_path / "nodomain.jsonl", [PROMPT_RESPONSE])
    with pytest.raises(InputError, match="line 1.*'domain'"):
        load_domains(missing)


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [CHAT, ALPACA], raw_lines=['{"prompt": "x",'])
    with pytest.raises(InputError) as info:
        load_domains({"a": path})
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    assert info.value.path == str(path)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"prompt": "x"}, "response"),
        ({"prompt": "x", "response": 3}, "response"),
        ({"instruction": "x"}, "output"),
        ({"text": "x"}, "messages"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
            "messages[1].role",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
            "messages",
        ),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
            "messages[1].content",
        ),
    ],
)
def test_missing_or_bad_field_names_line_and_field(tmp_path, record, field):
    path = _write_jsonl(tmp_path / "d.jsonl", [PROMPT_RESPONSE, record])
    with pytest.raises(InputError) as info:
        load_domains({"d": path})
    message = str(info.value)
    assert str(path) in message and "line 2" in message and repr(field) in message, message
    assert info.value.field == field


def test_empty_domain_duplicate_ids_and_missing_file(tmp_path):
    empty = _write_jsonl(tmp_path / "empty.jsonl", [], raw_lines=["", "  "])
    with pytest.raises(InputError, match="empty"):
        load_domains({"e": empty})
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{**PROMPT_RESPONSE, "id": 1}] * 2)
    with pytest.raises(InputError, match="line 2.*'id'.*duplicate"):
        load_domains({"d": dup})
    with pytest.raises(InputError, match="no such file"):
        load_domains({"d": tmp_path / "missing.jsonl"})


def test_json_parquet_and_saved_dataset(tmp_path):
    import datasets

    records = [PROMPT_RESPONSE, {"prompt": "3+3?", "response": "6"}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    sources = {"j": tmp_path / "d.json", "p": tmp_path / "d.parquet", "s": tmp_path / "saved"}
    domains = load_domains(sources)
    for name in sources:
        assert [ex.response for ex in domains[name]] == ["4", "6"]
    (tmp_path / "bad.json").write_text(json.dumps([PROMPT_RESPONSE, {"prompt": "q"}]))
    with pytest.raises(InputError, match="record 1.*'response'"):
        load_domains({"b": tmp_path / "bad.json"})


def test_reference_grouped_by_capability(tmp_path):
    records = [{**PROMPT_RESPONSE, "capability": c} for c in ["math", "code", "math"]]
    path = _write_jsonl(tmp_path / "ref.jsonl", records)
    grouped = load_reference(path)
    assert {c: len(v) for c, v in grouped.items()} == {"code": 1, "math": 2}
    per_file = load_reference({"math": path})
    assert all(ex.capability == "math" for ex in per_file["math"])
    with pytest.raises(InputError, match="capability 'qa' is empty"):
        load_reference(path, capability_names=["math", "code", "qa"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_file_names_file_and_line(tmp_path, suffix):

    path = tmp_path / f"bad{suffix}"
    good = b'{"prompt": "ok", "response": "b"}'
    bad = b'{"prompt": "a\xff", "response": "b"}'
    body = good + b"\n" + bad + b"\n" if suffix == ".jsonl" else b"[" + good + b",\n" + bad + b"]"
    path.write_bytes(body)
    with pytest.raises(InputError, match=r"bad\.json.*line 2.*not UTF-8"):
        load_domains({"x": str(path)})


def test_duplicate_domain_names_are_rejected(tmp_path):

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "domain": "a"}\n')
    with pytest.raises(InputError, match=r"data.domain_names.*more than once"):
        load_domains(str(path), domain_names=("a", "a"))
