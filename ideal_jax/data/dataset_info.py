"""LLaMA-Factory's `dataset_info.json`: its entries become domains (or reference capabilities).

    cfg.data.source = "/data/dataset_info.json"      # every entry is a domain
    cfg.data.domain_names = ("math", "code")        # or: these entries, in this order

An entry names a local file or folder relative to the JSON file (`file_name`), its `formatting`
(alpaca | sharegpt), optional `columns` (LLaMA-Factory's names → ours below) and, for sharegpt,
optional `tags` (role_tag, content_tag, user_tag, ...: how turns name their role and content).
Entries that point at a hub (`hf_hub_url`, `ms_hub_url`, `script_url`, `cloud_file_name`),
preference data (`ranking`) or unknown formattings are refused with an InputError naming the JSON
file, the entry and the field; so is an entry whose file is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ideal_jax.data import records
from ideal_jax.utils.errors import InputError

FILE_NAME = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
# LLaMA-Factory column name -> our canonical field (records.CANONICAL_FIELDS).
_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": "history",
    "messages": "messages",
    "system": "system",
}
# Defaults LLaMA-Factory assumes when `columns` leaves them out.
_DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
_REMOTE = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def is_dataset_info(path: str | os.PathLike) -> bool:
    """A dataset_info.json file, or a folder holding one that is not a `save_to_disk` dataset."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, FILE_NAME)) and not any(
            os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")
        )
    return os.path.basename(path) == FILE_NAME


def read_dataset_info(path: str) -> tuple[str, dict[str, Any]]:
    """(path of the JSON file, its entries)."""
    if os.path.isdir(path):
        path = os.path.join(path, FILE_NAME)
    if not os.path.isfile(path):
        raise InputError("no such file", path=path)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON at line {e.lineno}: {e.msg}", path=path) from None
    if not isinstance(info, dict) or not info:
        raise InputError("expected an object of dataset entries", path=path)
    return path, info


def load_entries(
    path: str | os.PathLike,
    names: Sequence[str] | None = None,
    *,
    field_map: Mapping[str, str] | None = None,
    kind: str = "domain",
) -> dict[str, list[records.Example]]:
    """{entry name: examples} for the named entries (all, in file order, when names is None)."""
    info_path, info = read_dataset_info(os.fspath(path))
    if names:
        unknown = [n for n in names if n not in info]
        if unknown:
            raise InputError(
                f"unknown {kind} names {unknown}; {FILE_NAME} has entries {sorted(info)}",
                path=info_path,
                field=f"{kind}_names" if kind == "domain" else kind,
            )
    result = {}
    for name in names or list(info):
        entry = info[name]
        source, entry_map, tags = _entry_source(info_path, name, entry)
        raw = records.read_records(source)
        if not raw:
            raise InputError(f"{kind} {name!r} is empty", path=source)
        result[name] = records.normalize_all(
            ((name, r) for r in raw), source, {**entry_map, **dict(field_map or {})}, tags
        )
    return result


def _entry_source(info_path: str, name: str, entry: Any) -> tuple[str, dict, dict]:
    """(data path, field map, chat tags) of one entry; every problem names the entry and field."""
    where = {"path": info_path, "record": f"entry {name!r}"}
    if not isinstance(entry, dict):
        raise InputError("expected an object", **where)
    if entry.get("ranking"):
        raise InputError("preference (ranking) datasets are not SFT data", field="ranking", **where)
    if "file_name" not in entry:
        remote = next((k for k in _REMOTE if k in entry), None)
        if remote:
            raise InputError(
                f"only local files are read ({remote} is remote); download it and set file_name",
                field=remote,
                **where,
            )
        raise InputError("required field is missing", field="file_name", **where)
    source = os.path.join(os.path.dirname(os.path.abspath(info_path)), str(entry["file_name"]))
    if not os.path.exists(source):
        raise InputError(f"the entry's file {source} does not exist", field="file_name", **where)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise InputError(
            f"formatting {formatting!r} is not supported; supported: {', '.join(FORMATTINGS)}",
            field="formatting",
            **where,
        )
    columns = {**_DEFAULT_COLUMNS[formatting], **dict(entry.get("columns") or {})}
    field_map = {}
    for column, field in columns.items():
        if column in _COLUMNS and field:
            field_map[_COLUMNS[column]] = field
        elif column not in ("tools", "images", "videos", "audios", "chosen", "rejected", "kto_tag"):
            raise InputError(f"unknown column {column!r}", field=f"columns.{column}", **where)
    tags = dict(entry.get("tags") or {})
    return source, field_map, tags
