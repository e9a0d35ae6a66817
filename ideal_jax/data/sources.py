"""Raw records from local sources: JSONL, JSON, Parquet, `save_to_disk` datasets and Hugging Face
dataset snapshot folders. Each record comes with a location label for error messages ("line 7",
"record 3", "data/train-00000-of-00001.parquet record 3"); data/records.py normalizes them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ideal_jax.utils.errors import InputError

# (location label for error messages, raw record)
RawRecord = tuple[str, dict[str, Any]]


def read_records(path: str | os.PathLike) -> list[RawRecord]:
    """Raw records of one local source, each with a location label ("line 7", "record 3")."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return _read_saved_dataset(path)
        return _read_snapshot(path)
    if not os.path.exists(path):
        raise InputError("no such file or directory", path=path)
    lower = path.lower()
    if lower.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(path)
    if lower.endswith(".json"):
        return _read_json(path)
    if lower.endswith(".parquet"):
        import datasets  # imported lazily: it is slow to import and only needed here

        table = datasets.Dataset.from_parquet(path, keep_in_memory=True)
        return [(f"record {i}", dict(row)) for i, row in enumerate(table)]
    raise InputError(
        "unknown file type (expected .jsonl, .json, .parquet or a dataset dir)", path=path
    )


def _read_jsonl(path: str) -> list[RawRecord]:
    # Parsed line by line ourselves: the datasets JSON loader reports malformed lines without a line
    # number and unifies schemas (missing fields silently become None).
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, f"line {lineno}")
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark (Windows editors)
            if not line.strip():
                continue
            value = _parse_json(json.loads, line, path, f"line {lineno}")
            if not isinstance(value, dict):
                raise InputError("expected a JSON object", path=path, record=f"line {lineno}")
            records.append((f"line {lineno}", value))
    return records


def _parse_json(parse, source, path: str, where: str | None):
    """parse(source) (json.loads / json.load); every way JSON text can fail is an InputError:
    malformed text, nesting deeper than Python's recursion limit, an integer too long to read."""
    try:
        return parse(source)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno}" if where is None else ""
        raise InputError(f"malformed JSON{at}: {e.msg}", path=path, record=where) from None
    except RecursionError:
        raise InputError("JSON nested too deeply to read", path=path, record=where) from None
    except ValueError as e:  # e.g. an integer of more than sys.get_int_max_str_digits() digits
        raise InputError(f"unreadable JSON value: {e}", path=path, record=where) from None


def _decode(raw: bytes, path: str, where: str) -> str:
    """UTF-8 text, or an InputError naming the file, the line and the byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode "
            "the file as UTF-8",
            path=path,
            record=where,
        ) from None


def _read_json(path: str) -> list[RawRecord]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        _decode(raw.splitlines()[line - 1], path, f"line {line}")
    with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is skipped
        value = _parse_json(json.load, f, path, None)
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise InputError("expected a list of records or {'data': [...]}", path=path)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InputError("expected a JSON object", path=path, record=f"record {i}")
    return [(f"record {i}", item) for i, item in enumerate(value)]


_DATA_FILES = (".parquet", ".jsonl", ".ndjson", ".json")


def _is_saved_dataset(path: str) -> bool:
    """`save_to_disk` output: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))


def _read_snapshot(path: str) -> list[RawRecord]:
    """A Hugging Face dataset snapshot folder: its train split's data files (or its only split's).

    Files are grouped by split from their names (`train-00000-of-00002.parquet`,
    `data/test.jsonl`, `train/part-0.parquet`); each record's location names its file.
    """
    files = []
    for base, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [
            os.path.join(base, n)
            for n in sorted(names)
            if n.lower().endswith(_DATA_FILES) and not n.startswith(".") and n not in _METADATA
        ]
    if not files:
        raise InputError(
            "directory is neither a saved dataset (save_to_disk) nor a dataset snapshot with "
            f"data files ({', '.join(_DATA_FILES)})",
            path=path,
        )
    splits: dict[str, list[str]] = {}
    for f in files:
        rel = os.path.relpath(f, path)
        parts = rel.replace(os.sep, "/").split("/")
        names = [p.split(".")[0].split("-")[0].lower() for p in parts]
        split = next((n for n in names if n in _SPLITS), "train")
        splits.setdefault(split, []).append(f)
    if "train" not in splits and len(splits) > 1:
        raise InputError(f"snapshot has splits {sorted(splits)}: expected 'train'", path=path)
    chosen = splits["train"] if "train" in splits else next(iter(splits.values()))
    records = []
    for f in chosen:
        rel = os.path.relpath(f, path)
        records += [(f"{rel} {loc}", rec) for loc, rec in read_records(f)]
    return records


_SPLITS = ("train", "test", "validation", "valid", "dev", "eval")
_METADATA = ("dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json")


def _read_saved_dataset(path: str) -> list[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(path, keep_in_memory=True)
    except FileNotFoundError as e:
        raise InputError(f"not a saved dataset directory ({e})", path=path) from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise InputError(f"DatasetDict with splits {list(loaded)}: expected 'train'", path=path)
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return [(f"record {i}", dict(row)) for i, row in enumerate(loaded)]
