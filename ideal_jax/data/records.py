"""Load SFT records from local files and normalize them to `Example`s.

Accepted sources (DESIGN.md "Data formats accepted"): JSONL, JSON (a list of records, or an object
with a "data" list), Parquet, and datasets saved with `datasets.Dataset.save_to_disk`. Either one
source per domain (`{"math": "math.jsonl", ...}`) or a single source whose records carry a `domain`
field.

Also a Hugging Face snapshot folder (`data/*.parquet`, `*.jsonl`, ...: its train split, or its only
split) and, via `data.source`, a LLaMA-Factory `dataset_info.json` (ideal_jax/data/dataset_info.py).
Whole sources become domains (or reference capabilities) in ideal_jax/data/domains.py.

Accepted record forms, detected in this order:
  chat:             {"messages": [{"role": ..., "content": ...}, ...]}  (last turn = the response)
  ShareGPT:         {"conversations": [{"from": "human" | "gpt" | ..., "value": ...}, ...]}
  Alpaca:           {"instruction": ..., "input": ..., "output": ..., "history": [[q, a], ...]}
                    ("input" and "history" optional; history turns come before the instruction)
  prompt/response:  {"prompt": ..., "response": ...}
A top-level "system" string becomes the first turn (unless the conversation has its own). Any other
shape is read through a field mapping from these canonical names to the record's own field names,
e.g. `{"prompt": "question", "response": "answer"}`; chat turns whose keys or role names differ are
read through `chat_tags` (LLaMA-Factory's names: role_tag, content_tag, user_tag, ...). A record or
turn that cannot be mapped is an error, never dropped.

Every problem with user data raises `InputError` naming the file, the record (JSONL: its line
number) and the field, before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ideal_jax.data.sources import RawRecord, read_records
from ideal_jax.utils.errors import InputError

# read_records and RawRecord live in sources.py; re-exported here for callers of this module.
__all__ = ["Example", "RawRecord", "normalize_all", "normalize_record"]
__all__ += ["read_records"]

ROLES = ("system", "user", "assistant", "tool")
ALL_ROW = "all"  # α's row for the whole reference set (ideal_jax/influence/alpha.py)
# Role names of chat turns -> ours: OpenAI / HF chat names and ShareGPT's (LLaMA-Factory's defaults:
# a function call is an assistant turn, an observation the tool's answer).
ROLE_NAMES = {
    **{role: role for role in ROLES},
    "human": "user",
    "gpt": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}
# LLaMA-Factory `tags` naming a role -> ours.
_ROLE_TAGS = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "assistant",
}
# Canonical field names a field mapping may redirect.
CANONICAL_FIELDS = (
    "id",
    "domain",
    "capability",
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "prompt",
    "response",
    "system",
    "history",
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
    # where in `source` ("line 7", "record 3"), for error messages; not part of the example
    location: str = dataclasses.field(default="", compare=False)

    def chat_messages(self) -> list[dict[str, str]]:
        """The whole conversation in chat form, the response as the last assistant message."""
        turns = [{"role": role, "content": content} for role, content in self.messages]
        return turns + [{"role": "assistant", "content": self.response}]


def _get(record: dict[str, Any], name: str, field_map: Mapping[str, str]) -> Any:
    return record.get(field_map.get(name, name))


def _string(value: Any, *, where: dict[str, Any], field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise InputError(f"field is {kind}", field=field, **where)
    if not allow_empty and not value.strip():
        raise InputError("field is empty", field=field, **where)
    check_unicode(value, where=where, field=field)
    return value


def check_unicode(value: str, *, where: dict[str, Any], field: str) -> None:
    """InputError unless `value` is valid Unicode text: a lone surrogate (JSON "\\ud800"
    escapes that pair with nothing) cannot be encoded, tokenized or written back as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(
            f"text holds a lone surrogate {value[e.start]!r} at character {e.start} (an unpaired "
            "\\ud800-\\udfff escape): not valid Unicode; fix or remove it",
            field=field,
            **where,
        ) from None


def normalize_record(
    record: dict[str, Any],
    *,
    domain: str,
    index: int,
    path: str,
    location: str,
    field_map: Mapping[str, str] | None = None,
    chat_tags: Mapping[str, str] | None = None,
) -> Example:
    """Turns one raw record into an `Example`; `index` is its position within its domain.

    chat_tags: LLaMA-Factory-style names for chat turns (role_tag, content_tag, user_tag,
    assistant_tag, system_tag, observation_tag, function_tag); defaults read both OpenAI-style
    turns (role/content) and ShareGPT turns (from/value).
    """
    fm = dict(field_map or {})
    where = {"path": path, "record": location}
    chat_field = fm.get("messages") or next(
        (f for f in ("messages", "conversations") if record.get(f) is not None), None
    )
    messages = record.get(chat_field) if chat_field else None
    if messages is not None:
        prompt, response = _chat_form(messages, where=where, field=chat_field, tags=chat_tags)
    elif _get(record, "instruction", fm) is not None or _get(record, "output", fm) is not None:
        instruction = _string(
            _get(record, "instruction", fm), where=where, field=fm.get("instruction", "instruction")
        )
        extra = _get(record, "input", fm)
        extra = (
            ""
            if extra is None
            else _string(extra, where=where, field=fm.get("input", "input"), allow_empty=True)
        )
        text = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        history = _history(
            _get(record, "history", fm), where=where, field=fm.get("history", "history")
        )
        prompt = history + [("user", text)]
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
            "unrecognized record: expected 'messages', 'conversations', 'instruction'/'output' "
            f"or 'prompt'/'response' (fields present: {sorted(record)}); pass a field mapping "
            "for other shapes",
            field="messages",
            **where,
        )
    system = _get(record, "system", fm)
    if system is not None and not (prompt and prompt[0][0] == "system"):
        system = _string(system, where=where, field=fm.get("system", "system"), allow_empty=True)
        if system.strip():
            prompt = [("system", system)] + prompt
    raw_id = _get(record, "id", fm)
    example_id = str(raw_id) if raw_id is not None else f"{domain}:{index}"
    check_unicode(example_id, where=where, field=fm.get("id", "id"))
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
        location=location,
    )


def _history(history: Any, *, where: dict[str, Any], field: str) -> list[tuple[str, str]]:
    """Alpaca `history`: [[instruction, response], ...] → the turns before the instruction."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise InputError("expected a list of [instruction, response] pairs", field=field, **where)
    turns = []
    for k, pair in enumerate(history):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InputError(
                "expected an [instruction, response] pair", field=f"{field}[{k}]", **where
            )
        turns.append(("user", _string(pair[0], where=where, field=f"{field}[{k}][0]")))
        turns.append(("assistant", _string(pair[1], where=where, field=f"{field}[{k}][1]")))
    return turns


def _chat_form(
    messages: Any,
    *,
    where: dict[str, Any],
    field: str,
    tags: Mapping[str, str] | None = None,
) -> tuple[list, str]:
    tags = dict(tags or {})
    names = dict(ROLE_NAMES)
    names.update({tags[t]: role for t, role in _ROLE_TAGS.items() if t in tags})
    if not isinstance(messages, list) or len(messages) < 2:
        raise InputError("expected a list of at least 2 messages", field=field, **where)
    turns = []
    for k, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"message {k} is not an object", field=f"{field}[{k}]", **where)
        sharegpt = "from" in message and "role" not in message
        role_key = tags.get("role_tag", "from" if sharegpt else "role")
        content_key = tags.get("content_tag", "value" if sharegpt else "content")
        raw_role = message.get(role_key)
        role = names.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise InputError(
                f"message {k} has unknown role {raw_role!r}; expected one of "
                f"{sorted(names)} (map others with chat tags)",
                field=f"{field}[{k}].{role_key}",
                **where,
            )
        content = _string(
            message.get(content_key),
            where=where,
            field=f"{field}[{k}].{content_key}",
            allow_empty=role != "assistant" or k != len(messages) - 1,
        )
        turns.append((role, content))
    if turns[-1][0] != "assistant":
        raise InputError("the last message must be the assistant response", field=field, **where)
    return turns[:-1], turns[-1][1]


def normalize_all(
    raw: Iterable[tuple[str, RawRecord]],
    path: str,
    field_map: Mapping[str, str] | None,
    chat_tags: Mapping[str, str] | None = None,
) -> list[Example]:
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for index, (domain, (location, record)) in enumerate(raw):
        ex = normalize_record(
            record,
            domain=domain,
            index=index,
            path=path,
            location=location,
            field_map=field_map,
            chat_tags=chat_tags,
        )
        note_unique_id(seen, ex.id, path, location)
        examples.append(ex)
    return examples


def note_unique_id(seen: dict, example_id: str, path, location) -> None:
    """Remember where `example_id` was read; InputError naming both places if seen before."""
    if example_id in seen:
        raise InputError(
            f"duplicate id {example_id!r} (first at {seen[example_id]})",
            path=path,
            record=location,
            field="id",
        )
    seen[example_id] = location
