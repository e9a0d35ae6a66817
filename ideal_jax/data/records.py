"""Load SFT records from local files and normalize them to `Example`s.

Accepted sources (DESIGN.md "Data formats accepted"): JSONL, JSON (a list of records, or an object
with a "data" list), Parquet, and datasets saved with `datasets.Dataset.save_to_disk`. Either one
source per domain (`{"math": "math.jsonl", ...}`) or a single source whose records carry a `domain`
field.

Accepted record forms, detected in this order:
  chat:             {"messages": [{"role": ..., "content": ...}, ...]}  (last turn = the response)
  Alpaca:           {"instruction": ..., "input": ..., "output": ...}   ("input" optional)
  prompt/response:  {"prompt": ..., "response": ...}
Any other shape is read through a field mapping from these canonical names to the record's own field
names, e.g. `{"prompt": "question", "response": "answer"}`.

Every problem with user data raises `InputError` naming the file, the record (JSONL: its line
number) and the field, before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ideal_jax.utils.errors import InputError

ROLES = ("system", "user", "assistant", "tool")
# Canonical field names a field mapping may redirect.
CANONICAL_FIELDS = (
    "id",
    "domain",
    "capability",
    "messages",
    "instruction",
    "input",
    "output",
    "prompt",
    "response",
    "system",
)


@dataclasses.dataclass(frozen=True)
class Example:
    """One normalized SFT example: the prompt turns and the response the loss is computed on."""

    id: str
    domain: str
    messages: tuple[tuple[str, str], ...]  # prompt part only: ((role, content), ...)
    response: str
    capability: str | None = None
    source: str = ""

    def chat_messages(self) -> list[dict[str, str]]:
        """The whole conversation in chat form, the response as the last assistant message."""
        turns = [{"role": role, "content": content} for role, content in self.messages]
        return turns + [{"role": "assistant", "content": self.response}]


# (location label for error messages, raw record)
RawRecord = tuple[str, dict[str, Any]]


def read_records(path: str | os.PathLike) -> list[RawRecord]:
    """Raw records of one local source, each with a location label ("line 7", "record 3")."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_saved_dataset(path)
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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"malformed JSON: {e.msg}", path=path, record=f"line {lineno}"
                ) from e
            if not isinstance(value, dict):
                raise InputError("expected a JSON object", path=path, record=f"line {lineno}")
            records.append((f"line {lineno}", value))
    return records


def _read_json(path: str) -> list[RawRecord]:
    with open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON at line {e.lineno}: {e.msg}", path=path) from e
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise InputError("expected a list of records or {'data': [...]}", path=path)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InputError("expected a JSON object", path=path, record=f"record {i}")
    return [(f"record {i}", item) for i, item in enumerate(value)]


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


def _get(record: dict[str, Any], name: str, field_map: Mapping[str, str]) -> Any:
    return record.get(field_map.get(name, name))


def _string(value: Any, *, where: dict[str, Any], field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise InputError(f"field is {kind}", field=field, **where)
    if not allow_empty and not value.strip():
        raise InputError("field is empty", field=field, **where)
    return value


def normalize_record(
    record: dict[str, Any],
    *,
    domain: str,
    index: int,
    path: str,
    location: str,
    field_map: Mapping[str, str] | None = None,
) -> Example:
    """Turns one raw record into an `Example`; `index` is its position within its domain."""
    fm = dict(field_map or {})
    where = {"path": path, "record": location}
    messages = _get(record, "messages", fm)
    if messages is not None:
        prompt, response = _chat_form(messages, where=where, field=fm.get("messages", "messages"))
    elif _get(record, "instruction", fm) is not None or _get(record, "output", fm) is not None:
        instruction = _string(
            _get(record, "instruction", fm), where=where, field=fm.get("instruction", "instruction")
        )
        extra = _get(record, "input", fm)
        extra = (
            "" if extra is None else _string(extra, where=where, field="input", allow_empty=True)
        )
        text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        prompt = [("user", text)]
        response = _string(
            _get(record, "output", fm), where=where, field=fm.get("output", "output")
        )
    elif _get(record, "prompt", fm) is not None or _get(record, "response", fm) is not None:
        prompt = [
            (
                "user",
                _string(_get(record, "prompt", fm), where=where, field=fm.get("prompt", "prompt")),
            )
        ]
        response = _string(
            _get(record, "response", fm), where=where, field=fm.get("response", "response")
        )
    else:
        raise InputError(
            "unrecognized record: expected 'messages', 'instruction'/'output' or "
            "'prompt'/'response'"
            f" (fields present: {sorted(record)}); pass a field mapping for other shapes",
            field="messages",
            **where,
        )
    system = _get(record, "system", fm)
    if system is not None and messages is None:
        prompt = [("system", _string(system, where=where, field="system"))] + prompt
    raw_id = _get(record, "id", fm)
    example_id = str(raw_id) if raw_id is not None else f"{domain}:{index}"
    capability = _get(record, "capability", fm)
    if capability is not None:
        capability = _string(capability, where=where, field=fm.get("capability", "capability"))
    return Example(
        id=example_id,
        domain=domain,
        messages=tuple(prompt),
        response=response,
        capability=capability,
        source=path,
    )


def _chat_form(messages: Any, *, where: dict[str, Any], field: str) -> tuple[list, str]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise InputError("expected a list of at least 2 messages", field=field, **where)
    turns = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"message {k} is not an object", field=field, **where)
        role = message.get("role")
        if role not in ROLES:
            raise InputError(
                f"message {k} has role {role!r}; expected {ROLES}", field="role", **where
            )
        content = _string(
            message.get("content"),
            where=where,
            field=f"{field}[{k}].content",
            allow_empty=role != "assistant" or k != len(messages) - 1,
        )
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise InputError("the last message must be the assistant response", field=field, **where)
    return turns[:-1], turns[-1][1]


def _normalize_all(
    raw: Iterable[tuple[str, RawRecord]], path: str, field_map: Mapping[str, str] | None
) -> list[Example]:
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for index, (domain, (location, record)) in enumerate(raw):
        ex = normalize_record(
            record, domain=domain, index=index, path=path, location=location, field_map=field_map
        )
        if ex.id in seen:
            raise InputError(
                f"duplicate id {ex.id!r} (first at {seen[ex.id]})",
                path=path,
                record=location,
                field="id",
            )
        seen[ex.id] = location
        examples.append(ex)
    return examples


def load_domains(
    sources: Mapping[str, str | os.PathLike] | str | os.PathLike,
    *,
    domain_names: Sequence[str] | None = None,
    field_map: Mapping[str, str] | None = None,
    group_field: str = "domain",
) -> dict[str, list[Example]]:
    """Loads training domains: `{domain: path}` or one path whose records carry `group_field`.

    `domain_names` (from the config) fixes the order of the result; with a single source every
    record's domain must be one of them, and each named domain must have records.
    """
    if isinstance(sources, Mapping):
        if domain_names is not None:
            unknown = [d for d in domain_names if d not in sources]
            if unknown:
                raise InputError(
                    f"unknown domain names {unknown}; sources name {sorted(sources)}",
                    field="domains",
                )
        names = list(domain_names) if domain_names is not None else list(sources)
        result = {}
        for name in names:
            path = os.fspath(sources[name])
            raw = read_records(path)
            if not raw:
                raise InputError(f"domain {name!r} is empty", path=path)
            result[name] = _normalize_all(((name, r) for r in raw), path, field_map)
        return result
    return _load_grouped(os.fspath(sources), domain_names, field_map, group_field, "domain")


def load_reference(
    sources: Mapping[str, str | os.PathLike] | str | os.PathLike,
    *,
    capability_names: Sequence[str] | None = None,
    field_map: Mapping[str, str] | None = None,
    group_field: str = "capability",
) -> dict[str, list[Example]]:
    """Loads the reference set grouped by capability (one file per capability, or a field)."""
    if isinstance(sources, Mapping):
        grouped = load_domains(sources, domain_names=capability_names, field_map=field_map)
        return {
            cap: [dataclasses.replace(ex, capability=cap) for ex in exs]
            for cap, exs in grouped.items()
        }
    grouped = _load_grouped(
        os.fspath(sources), capability_names, field_map, group_field, "capability"
    )
    return {
        cap: [dataclasses.replace(ex, capability=cap) for ex in exs] for cap, exs in grouped.items()
    }


def _load_grouped(
    path: str,
    names: Sequence[str] | None,
    field_map: Mapping[str, str] | None,
    group_field: str,
    kind: str,
) -> dict[str, list[Example]]:
    raw = read_records(path)
    if not raw:
        raise InputError("source is empty", path=path)
    key = (field_map or {}).get(group_field, group_field)
    groups: dict[str, list[RawRecord]] = {}
    for location, record in raw:
        group = record.get(key)
        if not isinstance(group, str) or not group:
            raise InputError(f"missing {kind} name", path=path, record=location, field=key)
        if names is not None and group not in names:
            raise InputError(
                f"unknown {kind} {group!r}; configured: {list(names)}",
                path=path,
                record=location,
                field=key,
            )
        groups.setdefault(group, []).append((location, record))
    order = list(names) if names is not None else sorted(groups)
    result = {}
    for name in order:
        if name not in groups:
            raise InputError(f"{kind} {name!r} is empty (no records name it)", path=path, field=key)
        result[name] = _normalize_all(((name, r) for r in groups[name]), path, field_map)
    return result
