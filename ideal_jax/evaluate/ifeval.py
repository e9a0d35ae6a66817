"""Verifiable instruction following, IFEval style (Zhou et al. 2023), without a registry.

A record is ``{"prompt", "instruction_id_list": [id, ...], "kwargs": [dict, ...]}`` exactly as in
the published ``input_data.jsonl``. ``CHECKERS`` is an explicit dict from instruction id to a
function ``check(response, kw) -> bool``; ``kw`` is that instruction's kwargs with None values
dropped (the HF copy of the data fills every kwarg key of every instruction with None).

Reported: prompt-level strict accuracy (all instructions of a prompt followed), instruction-level
strict accuracy, their loose variants (IFEval's: also accept the response without its first / last
line or without '*'), and the ids met that have no checker (they count as not followed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

Checker = Callable[[str, dict], bool]


def _compare(count: int, relation: str, target: int) -> bool:
    """IFEval relations: 'less than' is strict, 'at least' is inclusive."""
    if relation == "less than":
        return count < target
    if relation == "at least":
        return count >= target
    raise ValueError(f"unknown relation {relation!r}")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def count_sentences(text: str) -> int:
    """Sentences end at . ! ? before space or end; abbreviations and decimals do not end one."""
    text = re.sub(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e)\.", "<abbr>", text)
    text = re.sub(r"(\d)\.(\d)", r"\1<dot>\2", text)
    parts = re.split(r"[.!?]+(?:\s+|$)", text.strip())
    return len([p for p in parts if p.strip()])


def _paragraphs_stars(text: str) -> list[str]:
    return re.split(r"\s?\*\*\*\s?", text)


def _num_paragraphs(response: str, kw: dict) -> bool:
    parts = _paragraphs_stars(response)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i == 0 or i == len(parts) - 1:
                n -= 1  # a leading/trailing separator is tolerated ...
            else:
                return False  # ... an empty paragraph in the middle is not
    return n == kw["num_paragraphs"]


def _nth_paragraph_first_word(response: str, kw: dict) -> bool:
    paragraphs = [p for p in re.split(r"\n\n", response) if p.strip()]
    nth = kw["nth_paragraph"]
    if len(paragraphs) != kw["num_paragraphs"] or nth > len(paragraphs) or nth < 1:
        return False
    first = paragraphs[nth - 1].strip().split()
    word = re.sub(r"[^\w]", "", first[0]).lower() if first else ""
    return word == kw["first_word"].lower()


def _json_format(response: str, kw: dict) -> bool:
    text = response.strip()
    text = re.sub(r"^```(?:json|Json|JSON)?\s*", "", text)
    text = re.sub(r"\s*```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _bullets(response: str, kw: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def _highlights(response: str, kw: dict) -> bool:
    single = re.findall(r"\*[^\n\*]*\*", response)
    double = re.findall(r"\*\*[^\n\*]*\*\*", response)
    n = sum(1 for h in single if h.strip("*").strip()) + sum(
        1 for h in double if h.removeprefix("**").removesuffix("**").strip()
    )
    return n >= kw["num_highlights"]


def _sections(response: str, kw: dict) -> bool:
    splitter = kw.get("section_spliter", "Section").strip()
    parts = re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", response)
    return len(parts) - 1 >= kw["num_sections"]


def _two_responses(response: str, kw: dict) -> bool:
    parts = [p.strip() for p in response.split("******")]
    valid = [p for i, p in enumerate(parts) if p or i in (0, len(parts) - 1)]
    nonempty = [p for p in valid if p]
    return len(nonempty) == 2 and nonempty[0] != nonempty[1]


def _capital_words(response: str, kw: dict) -> bool:
    n = len([w for w in _words(response) if w.isupper()])
    return _compare(n, kw["capital_relation"], kw["capital_frequency"])


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

CHECKERS: dict[str, Checker] = {
    "length_constraints:number_words": lambda r, kw: _compare(
        len(_words(r)), kw["relation"], kw["num_words"]
    ),
    "length_constraints:number_sentences": lambda r, kw: _compare(
        count_sentences(r), kw["relation"], kw["num_sentences"]
    ),
    "length_constraints:number_paragraphs": _num_paragraphs,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "keywords:existence": lambda r, kw: all(
        re.search(re.escape(k), r, flags=re.IGNORECASE) for k in kw["keywords"]
    ),
    "keywords:frequency": lambda r, kw: _compare(
        len(re.findall(re.escape(kw["keyword"]), r, flags=re.IGNORECASE)),
        kw["relation"],
        kw["frequency"],
    ),
    "keywords:forbidden_words": lambda r, kw: (
        not any(
            re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE)
            for w in kw["forbidden_words"]
        )
    ),
    "keywords:letter_frequency": lambda r, kw: _compare(
        r.lower().count(kw["letter"].lower()), kw["let_relation"], kw["let_frequency"]
    ),
    "detectable_format:json_format": _json_format,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_format:title": lambda r, kw: any(
        t.strip("<>").strip() for t in re.findall(r"<<[^\n]+>>", r)
    ),
    "detectable_format:constrained_response": lambda r, kw: any(
        o in r.strip() for o in CONSTRAINED_OPTIONS
    ),
    "detectable_content:number_placeholders": lambda r, kw: (
        len(re.findall(r"\[.*?\]", r)) >= kw["num_placeholders"]
    ),
    "detectable_content:postscript": lambda r, kw: bool(
        re.search(
            r"\s*p\.\s?p\.\s?s.*$"
            if kw.get("postscript_marker", "P.S.").lower() == "p.p.s"
            else r"\s*" + re.escape(kw.get("postscript_marker", "P.S.").lower()) + r".*$",
            r.lower(),
            flags=re.MULTILINE,
        )
    ),
    "change_case:english_lowercase": lambda r, kw: r == r.lower() and any(c.isalpha() for c in r),
    "change_case:english_capital": lambda r, kw: r == r.upper() and any(c.isalpha() for c in r),
    "change_case:capital_word_frequency": _capital_words,
    "punctuation:no_comma": lambda r, kw: "," not in r,
    "startend:end_checker": lambda r, kw: (
        r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())
    ),
    "startend:starts_with": lambda r, kw: (
        r.strip().lower().startswith(kw["start_phrase"].strip().lower())
    ),
    "startend:quotation": lambda r, kw: (
        len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"'
    ),
    "combination:repeat_prompt": lambda r, kw: (
        r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())
    ),
    "combination:two_responses": _two_responses,
}


def _loose_variants(response: str) -> list[str]:
    """IFEval's loose mode: the response, and it without first line / last line / both, +/- '*'."""
    lines = response.split("\n")
    bases = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip()]
    bases.append("\n".join(lines[1:-1]).strip())
    return [v for b in bases for v in (b, b.replace("*", "")) if v.strip()]


def check_instruction(inst_id: str, response: str, kwargs: dict | None) -> bool | None:
    """Whether ``response`` follows one instruction; None if the id has no checker."""
    checker = CHECKERS.get(inst_id)
    if checker is None:
        return None
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if not response.strip():
        return False
    try:
        return bool(checker(response, kw))
    except (KeyError, TypeError, ValueError):  # kwargs the checker needs are missing or malformed
        return False


def score_ifeval(records: Sequence[dict], responses: Sequence[str]) -> dict:
    """Prompt- and instruction-level strict and loose accuracy of ``responses`` for ``records``."""
    prompt_strict = prompt_loose = inst_strict = inst_loose = n_inst = 0
    unsupported: dict[str, int] = {}
    for rec, resp in zip(records, responses, strict=True):
        all_s = all_l = True
        for inst_id, kw in zip(rec["instruction_id_list"], rec["kwargs"], strict=True):
            ok = check_instruction(inst_id, resp, kw)
            if ok is None:
                unsupported[inst_id] = unsupported.get(inst_id, 0) + 1
                ok_loose = False
            else:
                ok_loose = any(check_instruction(inst_id, v, kw) for v in _loose_variants(resp))
            ok = bool(ok)
            n_inst += 1
            inst_strict += ok
            inst_loose += ok_loose
            all_s &= ok
            all_l &= ok_loose
        prompt_strict += all_s
        prompt_loose += all_l
    n = max(1, len(records))
    return {
        "n_examples": len(records),
        "prompt_level_strict_acc": prompt_strict / n,
        "inst_level_strict_acc": inst_strict / max(1, n_inst),
        "prompt_level_loose_acc": prompt_loose / n,
        "inst_level_loose_acc": inst_loose / max(1, n_inst),
        "unsupported_instructions": unsupported,
    }


def ifeval_prompt(record: dict) -> str:
    """IFEval is zero-shot; the prompt is used verbatim (any chat template is the caller's)."""
    return record["prompt"]
