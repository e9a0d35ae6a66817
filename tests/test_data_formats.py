"""The data formats users already have: ShareGPT, Alpaca with history, LLaMA-Factory's
dataset_info.json, Hugging Face snapshot folders and save_to_disk datasets; a record that cannot be
mapped is an error naming the file, the record and the field (never a silent drop)."""

import json
import os
import subprocess
import sys

import pytest

from ideal_jax.data.domains import load_domains, load_reference
from ideal_jax.utils.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAREGPT = {
    "conversations": [
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
        {"from": "human", "value": "and 3+3?"},
        {"from": "gpt", "value": "6"},
    ],
    "system": "be brief",
}
ALPACA_HISTORY = {
    "instruction": "and times 3?",
    "input": "",
    "output": "12",
    "history": [["2+2?", "4"], ["plus 0?", "still 4"]],
}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sharegpt_turns_and_system(tmp_path):
    (ex,) = load_domains({"d": _jsonl(tmp_path / "s.jsonl", [SHAREGPT])})["d"]
    assert ex.messages == (
        ("system", "be brief"),
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "and 3+3?"),
    )
    assert ex.response == "6"


def test_sharegpt_unknown_role_names_file_record_field(tmp_path):
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}
    path = _jsonl(tmp_path / "s.jsonl", [SHAREGPT, bad])
    with pytest.raises(InputError, match="unknown role 'robot'") as e:
        load_domains({"d": path})
    assert (e.value.path, e.value.record, e.value.field) == (
        str(path),
        "line 2",
        "conversations[1].from",
    )


def test_alpaca_history_becomes_earlier_turns(tmp_path):
    (ex,) = load_domains({"d": _jsonl(tmp_path / "a.jsonl", [ALPACA_HISTORY])})["d"]
    assert ex.messages == (
        ("user", "2+2?"),
        ("assistant", "4"),
        ("user", "plus 0?"),
        ("assistant", "still 4"),
        ("user", "and times 3?"),
    )
    assert ex.response == "12"
    bad = {**ALPACA_HISTORY, "history": [["only the question"]]}
    with pytest.raises(InputError, match="pair") as e:
        load_domains({"d": _jsonl(tmp_path / "b.jsonl", [bad])})
    assert (e.value.record, e.value.field) == ("line 1", "history[0]")


def _llamafactory_dir(tmp_path):
    """A LLaMA-Factory data folder: an alpaca entry with renamed columns, a sharegpt entry with
    OpenAI-style tags, and a folder entry."""
    root = tmp_path / "lf"
    root.mkdir()
    (root / "math.json").write_text(
        json.dumps([{"q": "2+2?", "ctx": "", "a": "4", "hist": [["1+1?", "2"]]}])
    )
    chat = [
        {
            "msgs": [
                {"speaker": "me", "text": "hi"},
                {"speaker": "bot", "text": "hello"},
            ],
            "sys": "friendly",
        }
    ]
    _jsonl(root / "chat.jsonl", chat)
    (root / "sorting").mkdir()
    _jsonl(root / "sorting" / "train.jsonl", [{"instruction": "sort: ba", "output": "ab"}])
    info = {
        "math": {
            "file_name": "math.json",
            "columns": {"prompt": "q", "query": "ctx", "response": "a", "history": "hist"},
        },
        "chat": {
            "file_name": "chat.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "msgs", "system": "sys"},
            "tags": {
                "role_tag": "speaker",
                "content_tag": "text",
                "user_tag": "me",
                "assistant_tag": "bot",
            },
        },
        "sorting": {"file_name": "sorting"},
    }
    (root / "dataset_info.json").write_text(json.dumps(info))
    return root


def test_llamafactory_dataset_info_entries_are_domains(tmp_path):
    root = _llamafactory_dir(tmp_path)
    domains = load_domains(str(root / "dataset_info.json"))
    assert list(domains) == ["math", "chat", "sorting"]
    (math,) = domains["math"]
    assert math.messages == (("user", "1+1?"), ("assistant", "2"), ("user", "2+2?"))
    assert math.response == "4"
    (chat,) = domains["chat"]
    assert chat.messages == (("system", "friendly"), ("user", "hi")) and chat.response == "hello"
    assert domains["sorting"][0].response == "ab"
    # The folder works too; domain_names choose and order entries; capabilities likewise.
    picked = load_domains(str(root), domain_names=["sorting", "math"])
    assert list(picked) == ["sorting", "math"]
    reference = load_reference(str(root / "dataset_info.json"), capability_names=["chat"])
    assert reference["chat"][0].capability == "chat"
    with pytest.raises(InputError, match="unknown domain names"):
        load_domains(str(root), domain_names=["poetry"])


def test_llamafactory_missing_file_and_unsupported_entries(tmp_path):
    root = _llamafactory_dir(tmp_path)
    info_path = root / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["math"]["file_name"] = "nope.json"
    info_path.write_text(json.dumps(info))
    with pytest.raises(InputError, match="nope.json does not exist") as e:
        load_domains(str(info_path))
    assert (e.value.path, e.value.record, e.value.field) == (
        str(info_path),
        "entry 'math'",
        "file_name",
    )
    for entry, field in [
        ({"hf_hub_url": "org/data"}, "hf_hub_url"),
        ({"file_name": "chat.jsonl", "ranking": True}, "ranking"),
        ({"file_name": "chat.jsonl", "formatting": "openai"}, "formatting"),
        ({"file_name": "chat.jsonl", "columns": {"answer": "a"}}, "columns.answer"),
    ]:
        info_path.write_text(json.dumps({"x": entry}))
        with pytest.raises(InputError) as e:
            load_domains(str(info_path))
        assert (e.value.record, e.value.field) == ("entry 'x'", field)


def test_snapshot_folder_reads_the_train_split(tmp_path):
    import datasets

    data = tmp_path / "snap" / "data"
    data.mkdir(parents=True)
    (tmp_path / "snap" / "README.md").write_text("---\nlicense: mit\n---\n")
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    datasets.Dataset.from_list(rows[:2]).to_parquet(str(data / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(rows[2:4]).to_parquet(str(data / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(rows[4:]).to_parquet(str(data / "test-00000-of-00001.parquet"))
    assert [e.response for e in load_domains({"d": tmp_path / "snap"})["d"]] == [
        "a0",
        "a1",
        "a2",
        "a3",
    ]
    datasets.Dataset.from_list([{"prompt": "q"}]).to_parquet(str(data / "train-x.parquet"))
    with pytest.raises(InputError, match="train-x.parquet record 0") as e:
        load_domains({"d": tmp_path / "snap"})
    assert e.value.field == "response"


def test_saved_dataset_dict_uses_train(tmp_path):
    import datasets

    rows = [{"instruction": "sort: ba", "output": "ab"}]
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(rows),
        test=datasets.Dataset.from_list([{"instruction": "x", "output": "y"}]),
    ).save_to_disk(str(tmp_path / "saved"))
    assert [e.response for e in load_domains({"d": tmp_path / "saved"})["d"]] == ["ab"]


def test_cli_unknown_sharegpt_role_exits_2(tmp_path):
    """The command line: exit status 2, one line naming the file, the record and the field."""
    bad = {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}
    path = _jsonl(tmp_path / "s.jsonl", [SHAREGPT, bad])
    info = {"chat": {"file_name": "s.jsonl", "formatting": "sharegpt"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ideal_jax.main",
            "--config",
            "configs/tiny.py",
            "--workdir",
            str(tmp_path / "run"),
            "--config.data.demo=false",
            f"--config.data.source={tmp_path / 'dataset_info.json'}",
        ],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert str(path) in last and "line 2" in last and "'conversations[1].from'" in last, last
