"""One paired table from several mode=compare workdirs that share their seeds and D0.

    python benchmarks/pair_comparisons.py runs/compare_v3 runs/compare_tr:ideal=ideal_tr \\
        [--focus ideal_tr] [--out runs/paired.json]

Each argument is a comparison workdir, optionally with renames (`method=new_name`, comma-
separated); a method is taken from the first workdir that has it. The workdirs must have trained
the same D0 for every seed (same config but for the step policy): the script checks that each
seed's D0 scores are identical across them (deterministic training), so a method of one workdir
can be paired seed by seed with a method of another. It prints, on the test split, every method's
average exact match (mean ± 95% CI over seeds), its paired difference to D0, the FOCUS method's
paired difference to every other method (with how many seeds it won), the dev reference loss, the
optimizer steps and tokens, and the compute in SFT epochs. The last line of stdout is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="DIR or DIR:method=name,...")
    parser.add_argument("--focus", default="ideal", help="the method paired against all others")
    parser.add_argument("--out", default="", help="also write the JSON here")
    return parser.parse_args(argv)


def _per_seed(comparison: dict, method: str) -> list[dict]:
    m = comparison["methods"][method]
    out = []
    for s, d in enumerate(m["dirs"]):
        with open(os.path.join(d, "eval.json")) as f:
            ev = json.load(f)
        caps = ev["tasks"]["demo"]["per_capability"] if "demo" in ev.get("tasks", {}) else {}
        ref = [v for k, v in (ev.get("reference_loss") or {}).items() if k != "all"]
        out.append(
            {
                "average": float(np.mean(list(caps.values()))) if caps else float("nan"),
                "per_capability": caps,
                "reference_loss": float(np.mean(ref)) if ref else float("nan"),
                "steps": m["train_steps"][s],
                "tokens": (m.get("train_tokens") or [None] * len(m["dirs"]))[s],
                "compute": m["compute_sft_epochs"]["mean"],
            }
        )
    return out


def collect(specs: list[str]) -> tuple[list[int], dict[str, list[dict]]]:
    methods: dict[str, list[dict]] = {}
    seeds, d0_avg = None, None
    for spec in specs:
        path, _, renames = spec.partition(":")
        rename = dict(r.split("=", 1) for r in renames.split(",") if r)
        with open(os.path.join(path, "comparison.json")) as f:
            comparison = json.load(f)
        if seeds is None:
            seeds = comparison["seeds"]
        if comparison["seeds"] != seeds:
            raise SystemExit(f"{path}: seeds {comparison['seeds']} differ from {seeds}")
        d0 = _per_seed(comparison, "d0")
        if d0_avg is None:
            d0_avg = [r["per_capability"] for r in d0]
        elif [r["per_capability"] for r in d0] != d0_avg:
            raise SystemExit(f"{path}: its D0 scores differ from the first workdir's: not paired")
        for method in comparison["methods"]:
            name = rename.get(method, method)
            if name not in methods:
                methods[name] = _per_seed(comparison, method)
    return seeds, methods


def table(seeds, methods: dict[str, list[dict]], focus: str) -> dict:
    from ideal_jax import stats

    out = {"seeds": seeds, "methods": {}, "focus": focus, "focus_vs": {}}
    d0 = methods["d0"]
    for name, runs in methods.items():
        avg = [r["average"] for r in runs]
        ref = [r["reference_loss"] for r in runs]
        out["methods"][name] = {
            "average": stats.mean_ci(avg),
            "vs_d0": stats.paired(avg, [r["average"] for r in d0]),
            "reference_loss": stats.mean_ci(ref),
            "reference_loss_vs_d0": stats.paired(ref, [r["reference_loss"] for r in d0]),
            "steps": sorted({r["steps"] for r in runs}),
            "tokens": float(np.mean([r["tokens"] for r in runs if r["tokens"] is not None]))
            if any(r["tokens"] is not None for r in runs)
            else None,
            "compute_sft_epochs": runs[0]["compute"],
        }
    if focus in methods:
        mine = [r["average"] for r in methods[focus]]
        for name, runs in methods.items():
            if name != focus:
                theirs = [r["average"] for r in runs]
                d = stats.paired(mine, theirs)
                d["wins"] = int(sum(a > b for a, b in zip(mine, theirs)))
                out["focus_vs"][name] = d
    return out


def format_table(result: dict) -> str:
    from ideal_jax.compare.report import format_cell

    n = len(result["seeds"])
    lines = [
        f"{n} seeds; test split exact match; ± = 95% CI; * = paired CI excludes 0",
        f"{'method':<12} {'average':>16} {'Δ vs D0':>18} {'dev ref loss':>16} "
        f"{'steps':>6} {'tokens':>9} {'SFT epochs':>10}",
    ]
    for name, e in result["methods"].items():
        tokens = f"{e['tokens']:,.0f}" if e["tokens"] else "—"
        delta = format_cell(e["vs_d0"], True) if name != "d0" else "—"
        lines.append(
            f"{name:<12} {format_cell(e['average']):>16} {delta:>18} "
            f"{format_cell(e['reference_loss']):>16} {'/'.join(map(str, e['steps'])):>6} "
            f"{tokens:>9} {e['compute_sft_epochs'] or float('nan'):>10.1f}"
        )
    if result["focus_vs"]:
        lines.append(f"{result['focus']} − method (average test exact match, paired):")
        for name, d in result["focus_vs"].items():
            lines.append(
                f"  − {name:<12} {format_cell(d, True):>18}  better in {d['wins']}/{n} seeds"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    seeds, methods = collect(args.workdirs)
    result = table(seeds, methods, args.focus)
    print(format_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
