"""Load benchmark files in their published formats from a local path into uniform records.

Readers: ``.jsonl`` / ``.jsonl.gz`` / ``.json`` (a list, or a dict holding one under 'examples',
'data', 'rows' or 'questions'; TruthfulQA's ``mc_task.json`` is a plain list), ``.parquet``,
MMLU's header-less ``.csv``, and a directory written by ``datasets.save_to_disk`` (a Dataset, or a
DatasetDict from which ``split`` is taken). Each benchmark's normalizer maps a raw record to the
fields the scorers use and raises ``InputError`` naming file, record index and field when one is
missing or malformed.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Callable

from ideal_jax.evaluate.answers import extract_gsm8k_answer, last_boxed
from ideal_jax.utils.errors import InputError

_LIST_KEYS = ("examples", "data", "rows", "questions", "instances")


def read_records(path: str, split: str | None = None) -> list[dict]:
    """Raw records of a local benchmark file or saved HF dataset directory."""
    if not os.path.exists(path):
        raise InputError("benchmark file not found", path=path)
    try:
        if os.path.isdir(path):
            return _read_hf_dir(path, split)
        if path.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path)
        if path.endswith((".json", ".json.gz")):
            with _open_text(path) as f:
                data = json.load(f)
            for key in _LIST_KEYS:
                if isinstance(data, dict) and isinstance(data.get(key), list):
                    data = data[key]
                    break
            if not isinstance(data, list):
                raise InputError(
                    f"expected a list of records (or one under {_LIST_KEYS})", path=path
                )
            return data
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if path.endswith(".csv"):
            with open(path, newline="", encoding="utf-8") as f:
                return [{"_row": row} for row in csv.reader(f)]
    except InputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:  # JSON errors are ValueErrors
        raise InputError(f"cannot read: {e}", path=path) from e
    raise InputError("unknown format (expected .jsonl[.gz], .json, .parquet, .csv, dir)", path=path)


def _open_text(path: str):
    return (
        gzip.open(path, "rt", encoding="utf-8")
        if path.endswith(".gz")
        else open(path, encoding="utf-8")
    )


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(
                    f"invalid JSON: {e.msg}", path=path, record=f"line {lineno}"
                ) from e
    return out


def _read_hf_dir(path: str, split: str | None) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise InputError(f"DatasetDict has splits {list(ds)}; set split", path=path)
            split = next(iter(ds))
        if split not in ds:
            raise InputError(f"split {split!r} not in {list(ds)}", path=path)
        ds = ds[split]
    return ds.to_list()


# ----------------------------------------------------------------------------- field access


class _Rec:
    """A raw record with its location, so every field error names file, record and field."""

    def __init__(self, raw: object, path: str, index: int):
        if not isinstance(raw, dict):
            raise InputError(
                f"record is {type(raw).__name__}, not an object", path=path, record=index
            )
        self.raw, self.path, self.index = raw, path, index

    def error(self, msg: str, field: str) -> InputError:
        return InputError(msg, path=self.path, record=self.index, field=field)

    def get(self, field: str, typ: type | tuple = str, optional: bool = False, default=None):
        if field not in self.raw or self.raw[field] is None:
            if optional:
                return default
            raise self.error("missing field", field)
        value = self.raw[field]
        if not isinstance(value, typ):
            raise self.error(f"expected {typ}, got {type(value).__name__}", field)
        return value

    def first(self, *fields: str, typ: type | tuple = str):
        """The first present one of several alternative field names (format variants)."""
        for f in fields:
            if self.raw.get(f) is not None:
                return self.get(f, typ)
        raise self.error("missing field", "|".join(fields))


def _gold_index(rec: _Rec, key, labels: list[str], field: str) -> int:
    """Gold option index from an int, a digit string, or a label letter/number in ``labels``."""
    if isinstance(key, bool):
        raise rec.error(f"bad answer {key!r}", field)
    if isinstance(key, int):
        idx = key
    elif isinstance(key, str) and key.strip() in labels:
        idx = labels.index(key.strip())
    elif isinstance(key, str) and key.strip().isdigit():
        idx = int(key.strip())
    else:
        raise rec.error(f"answer {key!r} is not one of the labels {labels}", field)
    if not 0 <= idx < len(labels):
        raise rec.error(f"answer index {idx} out of range for {len(labels)} choices", field)
    return idx


# ----------------------------------------------------------------------------- normalizers


def _gsm8k(r: _Rec) -> dict:
    solution = r.get("answer")
    answer = extract_gsm8k_answer(solution) if "####" in solution else None
    if answer is None:
        raise r.error("answer has no final '#### <number>'", "answer")
    return {"question": r.get("question"), "solution": solution, "answer": answer}


def _math(r: _Rec) -> dict:
    solution = r.get("solution")
    answer = r.get("answer", optional=True) or last_boxed(solution)
    if answer is None:
        raise r.error("solution has no \\boxed{} answer", "solution")
    return {"problem": r.get("problem"), "solution": solution, "answer": answer}


def _humaneval(r: _Rec) -> dict:
    return {f: r.get(f) for f in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}


def _mbpp(r: _Rec) -> dict:
    tests = r.get("test_list", list)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise r.error("expected a non-empty list of assert strings", "test_list")
    return {
        "task_id": r.raw.get("task_id", r.index),
        "text": r.first("text", "prompt"),
        "code": r.get("code"),
        "test_list": tests,
        "test_setup_code": r.get("test_setup_code", optional=True, default=""),
    }


def _arc(r: _Rec) -> dict:
    q = r.get("question", (str, dict))
    if isinstance(q, dict):  # the original AI2 jsonl: question = {stem, choices: [{text, label}]}
        stem = q.get("stem")
        raw_choices = q.get("choices")
        if not isinstance(stem, str) or not isinstance(raw_choices, list):
            raise r.error("expected {stem, choices}", "question")
        texts = [c.get("text") for c in raw_choices]
        labels = [str(c.get("label")) for c in raw_choices]
    else:  # HF allenai/ai2_arc: choices = {text: [...], label: [...]}
        stem = q
        ch = r.get("choices", dict)
        texts, labels = ch.get("text"), [str(x) for x in ch.get("label") or []]
    if not texts or not all(isinstance(t, str) for t in texts) or len(texts) != len(labels):
        raise r.error("expected parallel lists of choice texts and labels", "choices")
    gold = _gold_index(r, r.get("answerKey"), labels, "answerKey")
    return {"question": stem, "choices": texts, "gold": gold}


def _mmlu(r: _Rec) -> dict:
    if "_row" in r.raw:  # Hendrycks csv row: question, A, B, C, D, answer letter
        row = r.raw["_row"]
        if len(row) < 3:
            raise r.error(f"expected question, options, answer; got {len(row)} columns", "row")
        subject = os.path.basename(r.path).rsplit("_", 1)[0]
        choices, letters = row[1:-1], "ABCDEFGHIJ"[: len(row) - 2]
        return {
            "question": row[0],
            "subject": subject,
            "choices": choices,
            "gold": _gold_index(r, row[-1], list(letters), "answer"),
        }
    choices = r.get("choices", list)
    letters = list("ABCDEFGHIJ"[: len(choices)])
    return {
        "question": r.get("question"),
        "subject": r.get("subject", optional=True, default=""),
        "choices": choices,
        "gold": _gold_index(r, r.raw.get("answer"), letters, "answer"),
    }


def _hellaswag(r: _Rec) -> dict:
    endings = r.get("endings", list)
    out = {"choices": endings, "activity_label": r.get("activity_label", optional=True, default="")}
    if r.raw.get("ctx_a") is not None:
        out["ctx_a"], out["ctx_b"] = r.get("ctx_a"), r.get("ctx_b", optional=True, default="")
    else:
        out["ctx"] = r.get("ctx")
    out["gold"] = _gold_index(r, r.raw.get("label"), [str(i) for i in range(len(endings))], "label")
    return out


def _mc_targets(r: _Rec, field: str) -> tuple[list[str], list[int]]:
    t = r.get(field, dict)
    if "choices" in t and "labels" in t:  # HF truthful_qa/multiple_choice
        choices, labels = list(t["choices"]), [int(x) for x in t["labels"]]
    else:  # original mc_task.json: {answer text: 0/1}
        choices, labels = list(t), [int(v) for v in t.values()]
    if not choices or len(choices) != len(labels) or not any(labels):
        raise r.error("expected choices with at least one true label", field)
    return choices, labels


def _truthfulqa(r: _Rec) -> dict:
    choices, labels = _mc_targets(r, "mc1_targets")
    out = {"question": r.get("question"), "choices": choices, "gold": labels.index(1)}
    if r.raw.get("mc2_targets"):
        out["mc2_choices"], out["mc2_labels"] = _mc_targets(r, "mc2_targets")
    return out


def _bbh(r: _Rec) -> dict:
    return {"question": r.get("input"), "answer": [r.get("target")]}


def _open_qa(r: _Rec) -> dict:
    ans = r.first("answer", "answers", typ=(str, list, dict))
    if isinstance(ans, dict):  # TriviaQA: {value, aliases, normalized_aliases, ...}
        aliases = [ans.get("value")] + list(ans.get("aliases") or [])
        aliases += list(ans.get("normalized_aliases") or [])
    else:
        aliases = [ans] if isinstance(ans, str) else list(ans)
    aliases = [a for a in aliases if isinstance(a, str) and a.strip()]
    if not aliases:
        raise r.error("no non-empty answer alias", "answer")
    return {"question": r.get("question"), "answer": aliases}


def _ifeval(r: _Rec) -> dict:
    ids = r.get("instruction_id_list", list)
    kwargs = r.get("kwargs", list)
    if len(ids) != len(kwargs) or not all(isinstance(k, dict) for k in kwargs):
        raise r.error(f"expected {len(ids)} kwargs dicts, one per instruction id", "kwargs")
    return {
        "key": r.raw.get("key", r.index),
        "prompt": r.get("prompt"),
        "instruction_id_list": ids,
        "kwargs": kwargs,
    }


def _exact_match(r: _Rec) -> dict:
    ans = r.first("answer", "response", typ=(str, list))  # the demo suite's test files: response
    return {
        "prompt": r.get("prompt"),
        "answer": [ans] if isinstance(ans, str) else ans,
        "capability": r.get("capability", optional=True, default="all"),
    }


NORMALIZERS: dict[str, Callable[[_Rec], dict]] = {
    "gsm8k": _gsm8k,
    "math": _math,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "arc": _arc,
    "mmlu": _mmlu,
    "hellaswag": _hellaswag,
    "truthfulqa_mc": _truthfulqa,
    "bbh": _bbh,
    "nq": _open_qa,
    "triviaqa": _open_qa,
    "ifeval": _ifeval,
    "exact_match": _exact_match,
}


def normalize_records(kind: str, raw: list, path: str = "<memory>") -> list[dict]:
    """Map raw records of benchmark ``kind`` to the scorers' fields (InputError on bad records)."""
    if kind not in NORMALIZERS:
        raise InputError(f"unknown benchmark type {kind!r}; known: {sorted(NORMALIZERS)}")
    fn = NORMALIZERS[kind]
    return [fn(_Rec(rec, path, i)) for i, rec in enumerate(raw)]


def load_benchmark(
    kind: str, path: str, split: str | None = None, limit: int | None = None
) -> list[dict]:
    """Read and normalize a benchmark file; ``limit`` keeps the first N records."""
    raw = read_records(path, split)
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise InputError("no records", path=path)
    return normalize_records(kind, raw, path)
