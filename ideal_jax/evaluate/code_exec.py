"""Score generated code against unit tests: HumanEval / MBPP prompts and programs, pass@k.

The programs run in the sandbox of ideal_jax/evaluate/sandbox.py (`eval.code_sandbox`: bwrap,
inprocess or auto; docs/sandbox.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ideal_jax.evaluate.sandbox import SandboxLimits, resolve_sandbox, run_programs

HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```")
MBPP_STOPS = ("[DONE]", "\n```", "\nassert ")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    # Product form avoids the huge binomials.
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ----------------------------------------------------------------------------- HumanEval / MBPP


def clean_completion(completion: str, stops: Sequence[str]) -> str:
    """Strip a leading markdown fence and cut at the first stop sequence."""
    text = re.sub(r"^\s*```(?:python|py)?\s*\n", "", completion)
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def humaneval_prompt(problem: dict) -> str:
    """HumanEval is zero-shot: the prompt is the signature plus docstring."""
    return problem["prompt"]


def humaneval_program(problem: dict, completion: str) -> str:
    """Prompt + completion + the problem's test + the call of check() on the entry point."""
    body = clean_completion(completion, HUMANEVAL_STOPS)
    return f"{problem['prompt']}{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_prompt(problem: dict, shots: Sequence[dict] = ()) -> str:
    """The MBPP paper's format: task text, its tests, then code between [BEGIN] and [DONE]."""

    def block(p: dict) -> str:
        tests = "\n".join(p["test_list"])
        return (
            f"You are an expert Python programmer, and here is your task: {p['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
        )

    return "".join(f"{block(s)}{s['code']}\n[DONE]\n\n" for s in shots) + block(problem)


def mbpp_program(problem: dict, completion: str) -> str:
    """Setup code + completion + the asserts of test_list."""
    body = clean_completion(completion, MBPP_STOPS)
    tests = "\n".join(problem["test_list"])
    return f"{problem.get('test_setup_code', '')}\n{body}\n\n{tests}\n"


def score_code(
    problems: Sequence[dict],
    completions: Sequence[Sequence[str]],
    build: Callable[[dict, str], str],
    ks: Sequence[int] = (1,),
    limits: SandboxLimits | None = None,
    max_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    sandbox: str = "bwrap",
) -> dict:
    """pass@k (for each k <= samples per problem) of completions[i] (n samples) for problems[i].

    The result names the sandbox backend the programs ran under ("bwrap" or "inprocess");
    limits: SandboxLimits() when None.
    """
    limits = SandboxLimits() if limits is None else limits
    backend = resolve_sandbox(sandbox)
    programs, owner = [], []
    for i, (prob, samples) in enumerate(zip(problems, completions, strict=True)):
        for s in samples:
            programs.append(build(prob, s))
            owner.append(i)
    results = run_programs(programs, limits, max_workers, progress, backend)
    n = [len(s) for s in completions]
    c = [0] * len(problems)
    statuses: dict[str, int] = {}
    for i, r in zip(owner, results):
        c[i] += int(r.passed)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    out: dict = {"n_examples": len(problems), "statuses": statuses, "num_correct": c}
    out["sandbox"] = backend
    for k in ks:
        vals = [pass_at_k(ni, ci, k) for ni, ci in zip(n, c) if ni >= k]
        if vals:
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out
