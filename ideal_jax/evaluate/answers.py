"""Answer extraction and normalization for generative benchmarks.

Three families live here because they share the "generate, extract, compare" shape:
  * GSM8K-style numeric answers ("#### 1,234", "The answer is $5.", last number in the text);
  * MATH boxed answers (\\boxed{...} with nested braces, normalized like Hendrycks et al.'s
    ``is_equiv`` with a few extra cases: \\dfrac, a/b, \\text{units}, degrees, \\left/\\right);
  * short-answer exact match (BBH, NQ, TriviaQA): SQuAD normalization against gold aliases.

Each family also has its prompt format with optional few-shot examples. Everything is pure Python.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from fractions import Fraction

# ----------------------------------------------------------------------------- shared helpers


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """Cut a completion at the earliest stop sequence (generation itself has no stop criterion)."""
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


# ----------------------------------------------------------------------------- GSM8K numbers

# Thousands separators only in groups of three, so "1,2,3" is three numbers, not 123.
_NUMBER_RE = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\s?\.\d+")
GSM8K_STOPS = ("\n\nQuestion:", "Question:", "\n\n\n")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number written with commas, $ signs, trailing '.0' or '.'; else None.

    >>> normalize_number("$1,234.00")
    '1234'
    """
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if s.endswith("%"):
        s = s[:-1]
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    # Fractions keep "0.1" exact, so 1234.0 == 1234 and 0.30 == 0.3 compare equal as strings.
    if value.denominator == 1:
        return str(value.numerator)
    return str(float(value))


def extract_gsm8k_answer(text: str) -> str | None:
    """The final numeric answer in a GSM8K solution or model completion, normalized.

    Priority: text after the last '####'; then 'the answer is X'; then the last number in the text.
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        nums = _NUMBER_RE.findall(tail)
        if nums:
            return normalize_number(nums[0])
    m = list(re.finditer(r"answer is[:\s]*([^\n]*)", text, flags=re.IGNORECASE))
    if m:
        nums = _NUMBER_RE.findall(m[-1].group(1))
        if nums:
            return normalize_number(nums[0])
    nums = _NUMBER_RE.findall(text)
    return normalize_number(nums[-1]) if nums else None


def gsm8k_correct(completion: str, gold: str) -> bool:
    """Whether a completion's final number equals the gold number (gold may be a full solution)."""
    pred = extract_gsm8k_answer(truncate_at_stops(completion, GSM8K_STOPS))
    ref = extract_gsm8k_answer(gold)
    return pred is not None and pred == ref


def gsm8k_prompt(question: str, shots: Sequence[dict] = ()) -> str:
    """'Question: ...\\nAnswer:' format; shots are records with 'question' and 'solution'."""
    parts = [f"Question: {s['question']}\nAnswer: {s['solution']}\n\n" for s in shots]
    return "".join(parts) + f"Question: {question}\nAnswer:"


# ----------------------------------------------------------------------------- MATH boxed answers

MATH_STOPS = ("\n\nProblem:", "Problem:")


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} or \\fbox{...} (balanced braces) or '\\boxed x'."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    brace = rest.find("{")
    head = rest[: brace if brace >= 0 else len(rest)]
    if brace < 0 or head.strip() not in ("\\boxed", "\\fbox"):
        # "\boxed 5" form: the argument is the next token.
        m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    depth = 0
    for j in range(brace, len(rest)):
        if rest[j] == "{":
            depth += 1
        elif rest[j] == "}":
            depth -= 1
            if depth == 0:
                return rest[brace + 1 : j]
    return None  # unbalanced: the completion was cut off


def _brace_arg(s: str, i: int) -> tuple[str, int]:
    """Argument starting at s[i]: a {...} group (returns inner text) or a single character."""
    if i < len(s) and s[i] == "{":
        depth = 0
        for j in range(i, len(s)):
            depth += {"{": 1, "}": -1}.get(s[j], 0)
            if depth == 0:
                return s[i + 1 : j], j + 1
        return s[i + 1 :], len(s)
    return (s[i], i + 1) if i < len(s) else ("", i)


def _fix_fracs(s: str) -> str:
    """Rewrite every \\frac with its arguments braced: \\frac12 -> \\frac{1}{2}."""
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        num, k = _brace_arg(s, j + 5)
        den, k = _brace_arg(s, k)
        out.append(f"\\frac{{{_fix_fracs(num)}}}{{{_fix_fracs(den)}}}")
        i = k


def _unwrap_text(s: str) -> str:
    r"""\text{...}: drop a trailing unit ('5\text{ cm}'), unwrap anything else ('\text{(A)}')."""
    s = re.sub(r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z\s.^\d]*\}\s*$", "", s)
    return re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)


def normalize_math_answer(answer: str) -> str:
    """Canonical string of a MATH answer so that equivalent spellings compare equal."""
    s = answer.strip().replace("\n", "").replace("\\!", "")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\s*degrees?\b", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _unwrap_text(s).strip()
    s = s.rstrip(".").strip()
    # "x = 5" -> "5" (only a short variable name on the left, as in the reference normalizer).
    m = re.fullmatch(r"\s*[a-zA-Z]\w{0,2}\s*=\s*(.+)", s)
    if m:
        s = m.group(1)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # ".5" -> "0.5"
    s = _fix_fracs(s)
    # Plain a/b between integers means \frac{a}{b}.
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    # Numbers: 0.5, 1,000 and \frac{1}{2} get one canonical spelling.
    num = _as_fraction(s)
    if num is not None:
        if num.denominator == 1:
            return str(num.numerator)
        sign = "-" if num < 0 else ""
        return f"{sign}\\frac{{{abs(num.numerator)}}}{{{num.denominator}}}"
    return s


def _as_fraction(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m and int(m.group(3)) != 0:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?|-?\d+(\.\d+)?", s):
        return Fraction(s.replace(",", ""))
    return None


def math_equiv(pred: str | None, gold: str | None) -> bool:
    """Equivalence of two MATH answers after normalization."""
    if pred is None or gold is None:
        return False
    return normalize_math_answer(pred) == normalize_math_answer(gold)


def math_correct(completion: str, gold_answer: str) -> bool:
    """Whether the last boxed answer of a completion matches the gold answer."""
    text = truncate_at_stops(completion, MATH_STOPS)
    pred = last_boxed(text)
    if pred is None:  # few-shot formats without \boxed end with "The answer is X."
        m = re.findall(r"answer is:?\s*\$?([^$\n]+?)\$?\.?\s*$", text.strip(), flags=re.IGNORECASE)
        pred = m[-1] if m else None
    return math_equiv(pred, gold_answer)


def math_prompt(problem: str, shots: Sequence[dict] = ()) -> str:
    """'Problem: ...\\nSolution:' format; shots are records with 'problem' and 'solution'."""
    parts = [f"Problem: {s['problem']}\nSolution: {s['solution']}\n\n" for s in shots]
    return "".join(parts) + f"Problem: {problem}\nSolution:"


# ----------------------------------------------------------------------------- short-answer EM

QA_STOPS = ("\n",)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD normalization: lowercase, strip punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def extract_short_answer(completion: str) -> str:
    """The answer span of a free-form completion: after the last 'the answer is', else line one."""
    m = list(re.finditer(r"the answer is[:\s]*", completion, flags=re.IGNORECASE))
    if m:
        return completion[m[-1].end() :].split("\n")[0].strip()
    stripped = completion.strip()
    return stripped.split("\n")[0].strip() if stripped else ""


def exact_match(completion: str, golds: str | Sequence[str]) -> bool:
    """Whether the extracted answer equals any gold alias after normalization."""
    aliases = [golds] if isinstance(golds, str) else list(golds)
    pred = normalize_text(extract_short_answer(completion))
    return any(pred == normalize_text(g) for g in aliases)


def strict_match(completion: str, golds: str | Sequence[str]) -> bool:
    """Case- and punctuation-sensitive match after collapsing whitespace (the demo suite's grading:
    '-4' vs '4' and 'ABC' vs 'abc' differ). Single-line golds are compared with the first line."""
    aliases = [golds] if isinstance(golds, str) else list(golds)
    for gold in aliases:
        pred = completion.strip()
        if "\n" not in gold.strip():
            pred = pred.split("\n")[0]
        if " ".join(pred.split()) == " ".join(gold.split()):
            return True
    return False


def qa_prompt(question: str, shots: Sequence[dict] = (), answer_key: str = "answer") -> str:
    """'Q: ...\\nA:' format for NQ / TriviaQA / BBH; a shot's answer is its first alias."""
    parts = []
    for s in shots:
        gold = s[answer_key]
        gold = gold if isinstance(gold, str) else gold[0]
        parts.append(f"Q: {s['question']}\nA: {gold}\n\n")
    return "".join(parts) + f"Q: {question}\nA:"
