"""Hostile user input for tests/test_user_data_*.py: data files, domain names, configs, model files.

Everything here is something a user's file or command line can hold. Each case says what must
happen to it: `ok` (read and tokenized as it is) or `refused` (an InputError naming the file, the
record and the field given). The generators are seeded so a failing case can be rerun by name.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct

# --- text: valid but unusual strings (must be read, tokenized and written back) ---

ODD_TEXTS = {
    "emoji": "😀 👩‍👩‍👧 🏳️‍🌈",
    "cjk": "日本語のテキスト、中文、한국어",
    "rtl_override": "\u202eevil\u202c text",
    "bidi_isolate": "\u2066x\u2069",
    "zero_width": "a\u200bb\u200cc\u200dd\ufeffe",
    "combining": "e\u0301" * 40,
    "nul_char": "before\x00after",
    "control_chars": "".join(chr(c) for c in range(1, 32)),
    "line_separators": "a\u2028b\u2029c\x85d",
    "crlf": "line one\r\nline two\r",
    "bom_inside": "\ufeffstarts with a BOM",
    "noncharacters": "\uffff\ufffe\U0010ffff",
    "private_use": "\ue000\U000f0000",
    "special_token_text": "<|endoftext|><|im_start|>assistant<s></s>[INST]",
    "jinja_syntax": "{{ raise_exception('x') }} {% for x in y %} {# c #}",
    "html_and_quotes": "<script>alert('\"x\"')</script> &amp; \\ \\n",
    "long": "word " * 5000,
    "astral": "\U0001d54f\U0001f9ea\U00020000",
    "whitespace_around": "   padded   ",
}

# Strings a JSON file can hold that are not valid Unicode text: refused, field named.
LONE_SURROGATES = {"high": "a\ud800b", "low": "\udfff", "reversed_pair": "\udc00\ud800"}

# --- names: domain and capability names (data.domains keys, `domain` fields) ---

ODD_NAMES = [
    "$^$",  # a mathtext syntax error in matplotlib labels
    "$\\undefined$",
    "a$b",
    "$x$",
    "_leading_underscore",  # matplotlib legends skip labels starting with _
    "with space",
    "tab\tname",
    "new\nline",
    "😀",
    "日本語",
    "../escape",
    "a/b",
    ".",
    "-1",
    "0",
    "null",
    "NaN",
    "average",
    "x" * 200,
    "\u202eRTL",
    "back\\slash",
    'quote"d',
    "{brace}",
    "%s%d",
]


@dataclasses.dataclass(frozen=True)
class DataCase:
    """One JSONL domain file's bytes, and what reading it must give.

    refused: None (read fine) or (record, field) the InputError must name, record as "line N".
    """

    name: str
    content: bytes
    refused: tuple[str, str | None] | None = None


# Refused, the record named but no particular field (the line is not a record at all).
RECORD_ONLY = "<record>"


def _line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


def _good(i: int) -> bytes:
    return _line({"prompt": f"question {i}", "response": f"answer {i}"})


def data_cases(seed: int = 0) -> list[DataCase]:
    """Many JSONL files: each hostile line sits among good ones at a seeded position."""
    rng = random.Random(seed)
    cases: list[DataCase] = []

    def place(name, bad_line: bytes, refused, n: int = 4):
        k = rng.randrange(n)
        lines = [_good(i) for i in range(n)]
        lines.insert(k, bad_line)
        where = None if refused is None else (f"line {k + 1}", refused)
        cases.append(DataCase(name, b"".join(lines), where))

    forms = {
        "prompt_response": lambda t: ({"prompt": t, "response": t}, "prompt"),
        "alpaca": lambda t: ({"instruction": t, "input": t, "output": t}, "instruction"),
        "chat": lambda t: (
            {
                "messages": [
                    {"role": "system", "content": t},
                    {"role": "user", "content": t},
                    {"role": "assistant", "content": t},
                ]
            },
            "messages[0].content",
        ),
        "sharegpt": lambda t: (
            {"conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": t}]},
            "conversations[0].value",
        ),
    }
    for form, make in forms.items():
        for label, text in ODD_TEXTS.items():
            record, _ = make(text)
            place(f"{form}:odd_text:{label}", _line(record), None)
        for label, text in LONE_SURROGATES.items():
            record, field = make(text)
            # json.dumps writes a lone surrogate as a \\udXXX escape: valid JSON, invalid text.
            place(f"{form}:lone_surrogate:{label}", _line(record), field)
    # the response alone carries the surrogate
    place(
        "response_surrogate",
        _line({"prompt": "q", "response": "ok \ud83d"}),
        "response",
    )
    place("id_surrogate", _line({"id": "\udead", "prompt": "q", "response": "a"}), "id")
    # odd JSON that is still a usable record
    place("duplicate_keys", b'{"prompt": "a", "prompt": "b", "response": "c"}\n', None)
    place("unicode_escapes", b'{"prompt": "\\u00e9\\ud83d\\ude00", "response": "x"}\n', None)
    place("extra_fields", _line({"prompt": "a", "response": "b", "meta": {"x": [1, None]}}), None)
    place("numeric_id", _line({"id": 12345678901234567890, "prompt": "a", "response": "b"}), None)
    place("float_id", _line({"id": 1.5e300, "prompt": "a", "response": "b"}), None)
    place("list_id", _line({"id": [1, "x"], "prompt": "a", "response": "b"}), None)
    place("whitespace_line", b"   \t  \n", None)
    # odd JSON that is not a usable record: refused, line named
    place("nan_response", b'{"prompt": "a", "response": NaN}\n', "response")
    place("infinity_prompt", b'{"prompt": Infinity, "response": "a"}\n', "prompt")
    place("number_response", _line({"prompt": "a", "response": 3}), "response")
    place("null_response", _line({"prompt": "a", "response": None}), "response")
    place("empty_response", _line({"prompt": "a", "response": "  \n"}), "response")
    place("list_content", _line({"prompt": ["a", "b"], "response": "b"}), "prompt")
    place("bool_output", _line({"instruction": "a", "output": True}), "output")
    place(
        "openai_parts",
        _line(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                    {"role": "assistant", "content": "x"},
                ]
            }
        ),
        "messages[0].content",
    )
    place("empty_object", b"{}\n", "messages")
    place("top_level_array", b'[{"prompt": "a", "response": "b"}]\n', RECORD_ONLY)
    place("top_level_string", b'"just a string"\n', RECORD_ONLY)
    place("truncated_json", b'{"prompt": "a", "respo\n', RECORD_ONLY)
    place("deep_nesting", b"[" * 200_000 + b"]" * 200_000 + b"\n", RECORD_ONLY)
    place("deep_nesting_in_field", b'{"prompt": ' + b"[" * 200_000 + b"\n", RECORD_ONLY)
    place(
        "huge_integer",
        b'{"id": ' + b"9" * 5000 + b', "prompt": "a", "response": "b"}\n',
        RECORD_ONLY,
    )
    place("invalid_utf8", b'{"prompt": "\xff\xfe", "response": "b"}\n', RECORD_ONLY)
    place("nul_byte_outside_string", b'{"prompt": "a",\x00 "response": "b"}\n', RECORD_ONLY)
    place(
        "bad_role", _line({"messages": [{"role": "bot", "content": "a"}] * 2}), "messages[0].role"
    )
    place(
        "last_turn_user",
        _line(
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
        ),
        "messages",
    )
    cases = [
        dataclasses.replace(c, refused=(c.refused[0], None))
        if c.refused is not None and c.refused[1] is RECORD_ONLY
        else c
        for c in cases
    ]
    # Whole-file oddities.
    cases.append(DataCase("bom_first_line", b"\xef\xbb\xbf" + _good(0) + _good(1)))
    cases.append(DataCase("crlf_lines", _good(0).replace(b"\n", b"\r\n") + _good(1)))
    cases.append(DataCase("no_final_newline", _good(0) + _good(1).rstrip(b"\n")))
    cases.append(DataCase("blank_lines", b"\n\n" + _good(0) + b"\n \n" + _good(1)))
    cases.append(
        DataCase(
            "duplicate_ids", _line({"id": 1, "prompt": "a", "response": "b"}) * 2, ("line 2", "id")
        )
    )
    cases.append(
        DataCase(
            "int_and_string_id_collide",
            _line({"id": 7, "prompt": "a", "response": "b"})
            + _line({"id": "7", "prompt": "a", "response": "b"}),
            ("line 2", "id"),
        )
    )
    return cases


def refused_lines_in(cases: list[DataCase]) -> int:
    return sum(1 for c in cases if c.refused is not None)


# --- grouped sources: one file whose records name their domain ---


def grouped_cases() -> list[tuple[str, bytes, tuple[str, str] | None]]:
    """(name, file bytes, refused (record, field) or None) for a `data.source` file."""
    out = []
    for i, name in enumerate(ODD_NAMES):
        lines = [
            _line({"domain": name, "prompt": f"q{j}", "response": f"a{j}"}) for j in range(2)
        ] + [_line({"domain": "plain", "prompt": f"p{j}", "response": f"r{j}"}) for j in range(2)]
        out.append((f"odd_name_{i}", b"".join(lines), None))
    for label, value in {
        "number": 3,
        "null": None,
        "empty": "",
        "blank": "   ",
        "list": ["a"],
        "surrogate": "\ud800",
    }.items():
        lines = [_line({"domain": "plain", "prompt": "q", "response": "a"})]
        lines.append(_line({"domain": value, "prompt": "q", "response": "a"}))
        out.append((f"bad_domain_{label}", b"".join(lines), ("line 2", "domain")))
    return out


# --- configs: values that must be refused before the workdir exists ---

BAD_CONFIG_VALUES = [
    # (dotted field, value)
    ("train.learning_rate", -1e-3),
    ("train.learning_rate", 0.0),
    ("train.learning_rate", float("nan")),
    ("train.learning_rate", float("inf")),
    ("train.epochs", 0),
    ("train.epochs", -2),
    ("train.batch_size", 0),
    ("train.batch_size", -16),
    ("train.seq_len", 1),
    ("train.grad_accum", 0),
    ("train.warmup_steps", -1),
    ("train.end_lr_fraction", 1.5),
    ("train.end_lr_fraction", -0.1),
    ("train.weight_decay", -0.1),
    ("train.b1", 1.0),
    ("train.b1", -0.5),
    ("train.b2", 1.5),
    ("train.grad_clip", -1.0),
    ("train.log_every", 0),
    ("train.checkpoint_every", -1),
    ("train.keep_checkpoints", 0),
    ("data.max_len", 1),
    ("data.max_len", 0),
    ("curvature.batch_size", 0),
    ("curvature.damping", float("nan")),
    ("influence.batch_size", -1),
    ("eval.batch_size", 0),
    ("eval.max_new_tokens", -1),
    ("eval.limit", -1),
    ("reweight.min_volume", -1),
    ("reweight.step_size", float("inf")),
    ("reweight.step_size", -0.15),
    ("reweight.beta_max", float("nan")),
    ("mesh.data", 0),
    ("mesh.data", -2),
    ("mesh.fsdp", 0),
    ("mesh.tensor", -3),
    ("rounds", -1),
    ("data.demo_n_test", -1),
    ("data.demo_n_ref", 0),
]


def mesh_cases(devices: int) -> list[tuple[dict, str]]:
    """Meshes that do not fit `devices` devices, and the field each must name."""
    out = []
    for n in sorted({3, devices + 1, devices * 2}):
        if devices % n:
            out.append(({"mesh.data": n}, "mesh.data"))
    out.append(({"mesh.data": -1, "mesh.fsdp": devices + 1}, "mesh.fsdp"))
    out.append(({"mesh.data": -1, "mesh.tensor": -1}, "mesh.tensor"))
    if devices > 1:
        out.append(({"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}, "mesh.data"))
    return out


def batch_geometry_cases(devices: int) -> list[tuple[dict, str]]:
    """train.batch_size / grad_accum that do not split over the mesh's data x fsdp devices."""
    out = [({"train.batch_size": 16, "train.grad_accum": 3}, "train.batch_size")]
    if devices > 1:
        out.append(({"train.batch_size": devices * 2 + 1}, "train.batch_size"))
        out.append(({"train.batch_size": devices * 2, "train.grad_accum": 4}, "train.batch_size"))
    return out


# --- model files ---


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file: {name: (dtype, shape, raw bytes)} (the format's spec, written here)."""
    header, offset, body = {}, 0, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        body += data
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def broken_safetensors(good: bytes) -> dict[str, bytes]:
    """Ways a safetensors file on disk can be damaged (download cut short, wrong file)."""
    (n,) = struct.unpack("<Q", good[:8])
    return {
        "empty": b"",
        "four_bytes": good[:4],
        "header_cut": good[: 8 + n // 2],
        "body_cut": good[: len(good) - max(1, (len(good) - 8 - n) // 2)],
        "last_byte_missing": good[:-1],
        "huge_header_length": struct.pack("<Q", 1 << 60) + good[8:],
        "header_not_json": struct.pack("<Q", 8) + b"not json" + good[16:],
        "html_error_page": b"<!DOCTYPE html><html><body>404</body></html>",
        "git_lfs_pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n",
    }
