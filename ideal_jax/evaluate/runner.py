"""Run a list of benchmark tasks against a model reached through two callables.

``generate_fn(prompts, max_new_tokens, temperature, n) -> list[list[str]]`` returns n completions
per prompt; ``loglik_fn(list[(context, continuation)]) -> list[float]`` returns each
continuation's summed log-probability. A task config (a dict or ConfigDict) holds:

  type          one of TASK_TYPES (below); name defaults to it
  path | records  a local benchmark file / saved HF dataset dir, or in-memory raw records
  split, limit  DatasetDict split; keep the first ``limit`` records
  limit_per_capability  exact_match type: keep the first N records of each capability (after
                ``limit``), so a short run still scores every capability
  num_fewshot, fewshot_path, fewshot_split   shots come from fewshot_path, else from the evaluated
                records themselves (never an example as its own shot)
  max_new_tokens, temperature, n, ks         generation; pass@k for code tasks
  batch_size    prompts (or loglik requests) per call of the model callables
  timeout_s, memory_mb, max_workers           code sandbox
  sandbox       code tasks: "bwrap" | "inprocess" | "auto" (default: evaluate_tasks' code_sandbox,
                which stages.py takes from eval.code_sandbox; docs/sandbox.md)
  match         exact_match type only: "strict" (default) or "normalized" (SQuAD normalization)

Missing keys fall back to TASK_DEFAULTS[type]. A task that fails (bad file, malformed record,
missing loglik_fn) becomes ``{"error": ...}`` in the results and the remaining tasks still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from ideal_jax.evaluate import answers, code_exec, ifeval, multiple_choice
from ideal_jax.evaluate import sandbox as sandbox_lib
from ideal_jax.evaluate.loaders import load_benchmark, normalize_records
from ideal_jax.utils import progress as progress_lib
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError

GenerateFn = Callable[[list[str], int, float, int], list[list[str]]]

_GEN = {"num_fewshot": 0, "temperature": 0.0, "n": 1, "batch_size": 64}
TASK_DEFAULTS: dict[str, dict] = {
    "gsm8k": {**_GEN, "max_new_tokens": 256, "primary": "accuracy"},
    "math": {**_GEN, "max_new_tokens": 512, "primary": "accuracy"},
    "bbh": {**_GEN, "max_new_tokens": 256, "primary": "exact_match"},
    "nq": {**_GEN, "max_new_tokens": 32, "primary": "exact_match"},
    "triviaqa": {**_GEN, "max_new_tokens": 32, "primary": "exact_match"},
    "exact_match": {**_GEN, "max_new_tokens": 64, "match": "strict", "primary": "accuracy"},
    "ifeval": {**_GEN, "max_new_tokens": 1024, "primary": "prompt_level_strict_acc"},
    "humaneval": {**_GEN, "max_new_tokens": 512, "ks": (1,), "primary": "pass@1"},
    "mbpp": {**_GEN, "max_new_tokens": 512, "ks": (1,), "primary": "pass@1"},
    "arc": {"num_fewshot": 0, "batch_size": 256, "primary": "acc_norm"},
    "mmlu": {"num_fewshot": 0, "batch_size": 256, "primary": "acc"},
    "hellaswag": {"num_fewshot": 0, "batch_size": 256, "primary": "acc_norm"},
    "truthfulqa_mc": {"num_fewshot": 0, "batch_size": 256, "primary": "acc"},
}
TASK_TYPES = tuple(TASK_DEFAULTS)
# The paper's headline average is over these four capabilities when they were evaluated.
PAPER_AVERAGE_TYPES = ("gsm8k", "humaneval", "bbh", "ifeval")
_CODE_DEFAULTS = {"timeout_s": 10.0, "memory_mb": 1024, "max_workers": None}


def _as_dict(cfg) -> dict:
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def _shots(pool: Sequence[dict], k: int, exclude: int | None) -> list[dict]:
    """The first k pool records, skipping the evaluated example when the pool is the eval set."""
    return [r for i, r in enumerate(pool) if i != exclude][:k]


def _generate(generate_fn: GenerateFn, prompts: list[str], cfg: dict, bar) -> list[list[str]]:
    """Call generate_fn in batches, checking the shape of what comes back."""
    out: list[list[str]] = []
    bs = max(1, int(cfg["batch_size"]))
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        got = generate_fn(
            chunk, int(cfg["max_new_tokens"]), float(cfg["temperature"]), int(cfg["n"])
        )
        if len(got) != len(chunk) or any(len(g) != int(cfg["n"]) for g in got):
            raise ValueError(f"generate_fn must return {cfg['n']} completions for each prompt")
        out += [list(g) for g in got]
        bar.update(len(chunk))
    return out


def limit_per_capability(recs: list[dict], limit: int | None) -> list[dict]:
    """The first `limit` records of each capability, in order (all when `limit` is falsy)."""
    if not limit:
        return recs
    if int(limit) != limit or limit < 0:
        raise InputError(f"must be an integer >= 0, got {limit!r}", field="limit_per_capability")
    seen: dict[str, int] = {}
    out = []
    for r in recs:
        cap = r.get("capability", "all")
        if seen.get(cap, 0) < limit:
            seen[cap] = seen.get(cap, 0) + 1
            out.append(r)
    return out


def _mean_correct(flags: list[list[bool]]) -> float:
    """Accuracy averaged over samples, then examples (plain accuracy when n = 1)."""
    return sum(sum(f) / len(f) for f in flags) / max(1, len(flags))


def _run_task(cfg: dict, generate_fn, loglik_fn, progress: bool) -> dict:
    kind = cfg["type"]
    if "records" in cfg and cfg["records"] is not None:
        recs = normalize_records(kind, list(cfg["records"])[: cfg.get("limit")])
    elif cfg.get("path"):
        recs = load_benchmark(kind, cfg["path"], cfg.get("split"), cfg.get("limit"))
    else:
        raise InputError(f"task {cfg['name']!r} needs 'path' or 'records'", field="path")
    recs = limit_per_capability(recs, cfg.get("limit_per_capability"))
    k = int(cfg.get("num_fewshot") or 0)
    pool, own = recs, True
    if k and cfg.get("fewshot_path"):
        pool = load_benchmark(kind, cfg["fewshot_path"], cfg.get("fewshot_split"), k)
        own = False

    def shots(i: int) -> list[dict]:
        return _shots(pool, k, i if own else None) if k else []

    bar = progress_lib.bar(total=len(recs), desc=cfg["name"], unit="it", disable=not progress)
    try:
        if kind in multiple_choice.ITEM_BUILDERS:
            if loglik_fn is None:
                raise ValueError(f"task type {kind!r} needs a loglik_fn")
            build = multiple_choice.ITEM_BUILDERS[kind]
            items = [build(r, [build(s) for s in shots(i)]) for i, r in enumerate(recs)]
            out = multiple_choice.score_multiple_choice(items, loglik_fn, cfg["batch_size"])
            bar.update(len(recs))
            return out
        if generate_fn is None:
            raise ValueError(f"task type {kind!r} needs a generate_fn")
        return _run_generative(kind, cfg, recs, shots, generate_fn, bar)
    finally:
        bar.close()


def _run_generative(kind: str, cfg: dict, recs: list[dict], shots, generate_fn, bar) -> dict:
    if kind == "gsm8k":
        prompts = [answers.gsm8k_prompt(r["question"], shots(i)) for i, r in enumerate(recs)]
        gens = _generate(generate_fn, prompts, cfg, bar)
        flags = [[answers.gsm8k_correct(g, r["answer"]) for g in gs] for r, gs in zip(recs, gens)]
        return {"n_examples": len(recs), "accuracy": _mean_correct(flags)}
    if kind == "math":
        prompts = [answers.math_prompt(r["problem"], shots(i)) for i, r in enumerate(recs)]
        gens = _generate(generate_fn, prompts, cfg, bar)
        flags = [[answers.math_correct(g, r["answer"]) for g in gs] for r, gs in zip(recs, gens)]
        return {"n_examples": len(recs), "accuracy": _mean_correct(flags)}
    if kind in ("bbh", "nq", "triviaqa"):
        prompts = [answers.qa_prompt(r["question"], shots(i)) for i, r in enumerate(recs)]
        gens = _generate(generate_fn, prompts, cfg, bar)
        stops = ("\n\nQ:",) if kind == "bbh" else answers.QA_STOPS  # BBH answers may reason first
        flags = [
            [answers.exact_match(answers.truncate_at_stops(g, stops), r["answer"]) for g in gs]
            for r, gs in zip(recs, gens)
        ]
        return {"n_examples": len(recs), "exact_match": _mean_correct(flags)}
    if kind == "exact_match":
        # "strict" (default) grades case and signs, as the demo suite does; "normalized" is SQuAD's.
        match = answers.exact_match if cfg["match"] == "normalized" else answers.strict_match
        gens = _generate(generate_fn, [r["prompt"] for r in recs], cfg, bar)
        per_cap: dict[str, list[float]] = {}
        flags = []
        for r, gs in zip(recs, gens):
            f = [match(g, r["answer"]) for g in gs]
            flags.append(f)
            per_cap.setdefault(r["capability"], []).append(sum(f) / len(f))
        caps = {c: sum(v) / len(v) for c, v in sorted(per_cap.items())}
        return {"n_examples": len(recs), "accuracy": _mean_correct(flags), "per_capability": caps}
    if kind == "ifeval":
        gens = _generate(generate_fn, [ifeval.ifeval_prompt(r) for r in recs], cfg, bar)
        return ifeval.score_ifeval(recs, [gs[0] for gs in gens])
    if kind in ("humaneval", "mbpp"):
        if kind == "humaneval":
            prompts = [code_exec.humaneval_prompt(r) for r in recs]
            build = code_exec.humaneval_program
        else:
            prompts = [code_exec.mbpp_prompt(r, shots(i)) for i, r in enumerate(recs)]
            build = code_exec.mbpp_program
        gens = _generate(generate_fn, prompts, cfg, bar)
        limits = sandbox_lib.SandboxLimits(
            timeout_s=float(cfg["timeout_s"]), memory_bytes=int(cfg["memory_mb"]) << 20
        )
        ks = [int(x) for x in cfg["ks"]]
        return code_exec.score_code(
            recs, gens, build, ks, limits, cfg["max_workers"], sandbox=cfg["sandbox"]
        )
    raise InputError(f"unknown task type {kind!r}; known: {TASK_TYPES}", field="type")


def evaluate_tasks(
    task_cfgs: Sequence | Mapping,
    generate_fn: GenerateFn | None,
    loglik_fn: multiple_choice.LoglikFn | None,
    progress: bool = True,
    code_sandbox: str = "bwrap",
) -> dict:
    """Evaluate every task; returns a JSON-serializable dict of per-task metrics and the average.

    ``task_cfgs`` is a list of task configs, or a mapping name -> task config. Code tasks run
    under ``code_sandbox`` (a task's own ``sandbox`` key wins); if that backend is unusable here,
    InputError before any generation (sandbox_lib.resolve_sandbox).
    """
    items = task_cfgs.items() if isinstance(task_cfgs, Mapping) else [(None, c) for c in task_cfgs]
    for _, raw_cfg in items:
        user = _as_dict(raw_cfg)
        if user.get("type") in ("humaneval", "mbpp"):
            sandbox_lib.resolve_sandbox(user.get("sandbox", code_sandbox))
    tasks: dict[str, dict] = {}
    tasks_bar = progress_lib.bar(
        list(items), "eval tasks", unit="it", disable=not progress, leave=True
    )
    for name, raw_cfg in tasks_bar:
        user = _as_dict(raw_cfg)
        kind = user.get("type")
        name = name or user.get("name") or kind or f"task{len(tasks)}"
        defaults = {**_CODE_DEFAULTS, "sandbox": code_sandbox, **TASK_DEFAULTS.get(kind, {})}
        cfg = {**defaults, **user, "name": name}
        entry: dict = {"type": kind}
        try:
            if kind not in TASK_DEFAULTS:
                raise InputError(f"unknown task type {kind!r}; known: {TASK_TYPES}", field="type")
            metrics = _run_task(cfg, generate_fn, loglik_fn, progress)
            entry.update(metrics)
            entry["primary_metric"] = cfg["primary"]
            entry["primary"] = float(metrics[cfg["primary"]])
        except Exception as e:  # one broken benchmark must not cost the other results
            logging.exception("evaluation task %s failed", name)
            entry["error"] = f"{type(e).__name__}: {e}"
        tasks[name] = entry
    return {"tasks": tasks, **paper_average(tasks)}


def paper_average(tasks: Mapping[str, dict]) -> dict:
    """Mean primary metric over GSM8K/HumanEval/BBH/IFEval tasks if any ran, else over all tasks."""
    ok = {n: t for n, t in tasks.items() if "primary" in t}
    core = [n for n, t in ok.items() if t.get("type") in PAPER_AVERAGE_TYPES]
    names = core or list(ok)
    avg = sum(ok[n]["primary"] for n in names) / len(names) if names else None
    errors = sorted(n for n, t in tasks.items() if "error" in t)
    return {"average": avg, "average_over": names, "errors": errors}


def write_eval_json(results: dict, path: str) -> None:
    """Write results as JSON atomically (numpy / jax scalars become plain numbers)."""
    write_json_atomic(path, results)
