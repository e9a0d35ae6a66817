"""Multiple choice by log-likelihood of each option (ARC, MMLU, HellaSwag, TruthfulQA-MC).

An item is ``{"context": str, "choices": list[str], "gold": int}`` where each choice is the
*continuation* text scored after the context (usually with a leading space), plus for TruthfulQA-MC2
an optional ``"labels": list[int]`` marking every true option. The model is reached only through
``loglik_fn(list[(context, continuation)]) -> list[float]`` (sum of token log-probabilities of the
continuation), so all requests of a benchmark go out in one batched call.

Metrics: ``acc`` (argmax of the summed log-likelihood), ``acc_norm`` (argmax of log-likelihood per
byte of the continuation, as lm-evaluation-harness does, against the bias to short options),
and for items with ``labels`` ``mc2`` (normalized probability mass on the true options).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

LoglikFn = Callable[[list[tuple[str, str]]], list[float]]
LETTERS = "ABCDEFGHIJ"


def _with_shots(shots: Sequence[dict], body: str) -> str:
    """Prepend shots (items built without shots) with their gold continuation to a context."""
    return "".join(f"{s['bare_context']}{s['choices'][s['gold']]}\n\n" for s in shots) + body


def arc_item(rec: dict, shots: Sequence[dict] = ()) -> dict:
    """ARC: 'Question: q\\nAnswer:' scored against ' <choice text>'."""
    ctx = f"Question: {rec['question']}\nAnswer:"
    return {
        "context": _with_shots(shots, ctx),
        "choices": [f" {c}" for c in rec["choices"]],
        "gold": rec["gold"],
        "bare_context": ctx,
    }


def mmlu_item(rec: dict, shots: Sequence[dict] = ()) -> dict:
    """MMLU (Hendrycks format): question, lettered options, 'Answer:' scored against ' A'..' D'."""
    subject = rec.get("subject", "").replace("_", " ")
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    opts = "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(rec["choices"]))
    ctx = f"{rec['question'].strip()}\n{opts}Answer:"
    letters = [f" {LETTERS[i]}" for i in range(len(rec["choices"]))]
    shot_text = "".join(f"{s['bare_context']}{s['choices'][s['gold']]}\n\n" for s in shots)
    return {
        "context": header + shot_text + ctx,
        "choices": letters,
        "gold": rec["gold"],
        "bare_context": ctx,
    }


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow text carries ' [title]' markers and double spaces; remove them."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(rec: dict, shots: Sequence[dict] = ()) -> dict:
    """HellaSwag: 'activity: ctx_a Ctx_b' scored against ' <ending>'."""
    ctx_b = rec.get("ctx_b", "")
    ctx = rec["ctx_a"] + " " + ctx_b[:1].upper() + ctx_b[1:] if "ctx_a" in rec else rec["ctx"]
    ctx = _hellaswag_clean(f"{rec.get('activity_label', '')}: {ctx}".lstrip(": "))
    return {
        "context": _with_shots(shots, ctx),
        "choices": [" " + _hellaswag_clean(e) for e in rec["choices"]],
        "gold": rec["gold"],
        "bare_context": ctx,
    }


def truthfulqa_item(rec: dict, shots: Sequence[dict] = ()) -> dict:
    """TruthfulQA-MC: 'Q: q\\nA:' scored against ' <answer>'; MC2 labels kept when present."""
    ctx = f"Q: {rec['question']}\nA:"
    item = {
        "context": _with_shots(shots, ctx),
        "choices": [f" {c}" for c in rec["choices"]],
        "gold": rec["gold"],
        "bare_context": ctx,
    }
    if rec.get("mc2_choices"):
        item["mc2"] = {
            "choices": [f" {c}" for c in rec["mc2_choices"]],
            "labels": rec["mc2_labels"],
        }
    return item


ITEM_BUILDERS: dict[str, Callable[..., dict]] = {
    "arc": arc_item,
    "mmlu": mmlu_item,
    "hellaswag": hellaswag_item,
    "truthfulqa_mc": truthfulqa_item,
}


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def score_multiple_choice(
    items: Sequence[dict], loglik_fn: LoglikFn, chunk_size: int | None = None
) -> dict:
    """acc / acc_norm (and mc2 where items carry it) of log-likelihood choice over ``items``.

    All (context, continuation) pairs are sent to ``loglik_fn`` in chunks of ``chunk_size`` requests
    (one call if None), flattened item by item.
    """
    requests: list[tuple[str, str]] = []
    spans: list[tuple[int, int, int, int]] = []  # (start, n_choices, mc2_start, n_mc2)
    for it in items:
        start = len(requests)
        requests += [(it["context"], c) for c in it["choices"]]
        mc2 = it.get("mc2")
        mc2_start = len(requests)
        if mc2:
            requests += [(it["context"], c) for c in mc2["choices"]]
        spans.append((start, len(it["choices"]), mc2_start, len(mc2["choices"]) if mc2 else 0))
    scores = _call_chunked(loglik_fn, requests, chunk_size)
    correct, correct_norm, mc2_vals = 0, 0, []
    for it, (start, n, m_start, m_n) in zip(items, spans):
        ll = scores[start : start + n]
        lens = [max(1, len(c.encode("utf-8"))) for c in it["choices"]]
        correct += int(_argmax(ll) == it["gold"])
        correct_norm += int(_argmax([x / b for x, b in zip(ll, lens)]) == it["gold"])
        if m_n:
            mc2_vals.append(_mc2(scores[m_start : m_start + m_n], it["mc2"]["labels"]))
    total = max(1, len(items))
    out = {"n_examples": len(items), "acc": correct / total, "acc_norm": correct_norm / total}
    if mc2_vals:
        out["mc2"] = sum(mc2_vals) / len(mc2_vals)
    return out


def _mc2(ll: Sequence[float], labels: Sequence[int]) -> float:
    """Probability mass on true options, normalized over all options (TruthfulQA MC2)."""
    top = max(ll)
    probs = [math.exp(x - top) for x in ll]  # shift for stability; the ratio is unchanged
    true = sum(p for p, lab in zip(probs, labels) if lab)
    return true / sum(probs)


def _call_chunked(
    loglik_fn: LoglikFn, requests: list[tuple[str, str]], chunk_size: int | None
) -> list[float]:
    if not chunk_size:
        chunk_size = max(1, len(requests))
    out: list[float] = []
    for i in range(0, len(requests), chunk_size):
        chunk = requests[i : i + chunk_size]
        got = list(loglik_fn(chunk))
        if len(got) != len(chunk):
            raise ValueError(f"loglik_fn returned {len(got)} scores for {len(chunk)} requests")
        out += [float(x) for x in got]
    return out
