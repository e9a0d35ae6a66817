"""comparison.json / comparison.png / the printed table of mode=compare (from per-seed results)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ideal_jax import stats
from ideal_jax.compare.config import CompareConfig
from ideal_jax.reweight import ReweightConfig

SINGLE_SEED_NOTE = (
    "one seed: these differences cannot be separated from training noise (the same mixture "
    "retrained with another seed moves single capabilities by more than a round does); ask for "
    "seeds, e.g. --config configs/demo.py:seeds=5, for paired 95% confidence intervals"
)


def build(
    per_seed: list[dict[str, Any]], cfg, settings: CompareConfig, reweight_cfg: ReweightConfig
) -> dict[str, Any]:
    """Per method of `settings.methods`: scores (mean ± ci95, paired Δ to D0 per metric),
    reference loss, compute."""
    methods = settings.methods
    runs = {m: [ps["methods"][m] for ps in per_seed] for m in methods}
    scores = stats.summarise_methods({m: [r["scores"] for r in runs[m]] for m in methods}, "d0")
    d0_ref = [r["reference_loss"] for r in runs["d0"]]
    out_methods = {}
    for m in methods:
        ref = [r["reference_loss"] for r in runs[m]]
        out_methods[m] = {
            "scores": scores[m],
            "reference_loss": {**stats.mean_ci(ref), "vs_d0": stats.paired(ref, d0_ref)},
            "compute_sft_epochs": stats.mean_ci([r.get("compute_sft_epochs") for r in runs[m]]),
            "train_steps": [r["train_steps"] for r in runs[m]],
            "train_tokens": [r.get("train_tokens") for r in runs[m]],
            "train_seed": [r.get("train_seed") for r in runs[m]],
            "chosen_on": [r.get("chosen_on") for r in runs[m]],
            "volumes": [r["volumes"] for r in runs[m]],
            "dirs": [r["dir"] for r in runs[m]],
        }
        extra = {
            key: [r.get(key) for r in runs[m]]
            for key in (
                "regression",
                "doremi_weights",
                "chosen",
                "selection_train_seed",
                "selection_reference_losses",
            )
        }
        out_methods[m].update({k: v for k, v in extra.items() if None not in v})
    # IDEAL against every other method, paired seed by seed (average test score, dev ref loss).
    ideal_vs = {}
    if "ideal" in methods:
        ideal_avg = [r["scores"]["average"] for r in runs["ideal"]]
        ideal_ref = [r["reference_loss"] for r in runs["ideal"]]
        for m in methods:
            if m != "ideal":
                ideal_vs[m] = {
                    "average": stats.paired(ideal_avg, [r["scores"]["average"] for r in runs[m]]),
                    "reference_loss": stats.paired(
                        ideal_ref, [r["reference_loss"] for r in runs[m]]
                    ),
                }
    ref_means = {m: out_methods[m]["reference_loss"]["mean"] for m in methods}
    best_ref = min(ref_means, key=ref_means.get)
    ref_gap = ref_means["d0"] - ref_means[best_ref]
    result = {
        "seeds": [ps["seed"] for ps in per_seed],
        "methods": out_methods,
        "ideal_vs": ideal_vs,
        "regret": {
            "average_score": stats.regret(scores, "average"),
            "reference_loss": {
                "best_method": best_ref,
                "d0": ref_means["d0"],
                "best": ref_means[best_ref],
                "gap": ref_gap,
                "share_closed": {
                    m: (ref_means["d0"] - v) / ref_gap if ref_gap > 0 else None
                    for m, v in ref_means.items()
                },
            },
        },
        "settings": {
            "rounds": int(cfg.rounds),
            "epochs": int(cfg.train.epochs),
            "k": int(settings.k),
            "step_size": float(reweight_cfg.step_size),
            "rule": reweight_cfg.rule,
            "operator": cfg.influence.operator,
            "budget": cfg.train.budget,
            "upsample": cfg.data.upsample,
            "sft_epoch_s": [ps["sft_epoch_s"] for ps in per_seed],
        },
    }
    if len(per_seed) == 1:
        result["note"] = SINGLE_SEED_NOTE
    return result


def format_cell(entry: dict[str, Any], signed: bool = False) -> str:
    if entry.get("mean") is None:
        return "—"
    mean = f"{entry['mean']:+.3f}" if signed else f"{entry['mean']:.3f}"
    ci = f" ± {entry['ci95']:.3f}" if entry.get("ci95") is not None else ""
    return mean + ci + (" *" if entry.get("significant") else "")


def format_table(comparison: dict[str, Any]) -> str:
    """Methods × (average, paired Δ to D0, reference loss, compute), then Δ per capability."""
    methods = comparison["methods"]
    n = len(comparison["seeds"])
    caps = [c for c in next(iter(methods.values()))["scores"] if c != "average"]
    lines = [
        f"comparison over {n} seed(s); scores on the test split, ref loss on the dev split; "
        "± = 95% CI over seeds; * = paired difference to D0 significant (CI excludes 0)",
        f"{'method':<8} {'average':>16} {'Δ average vs D0':>20} {'dev ref loss':>16} "
        f"{'Δ ref loss':>20} {'SFT epochs':>10} {'steps':>6} {'tokens':>9} {'chose on':>8}",
    ]
    for m, e in methods.items():
        avg = e["scores"]["average"]
        delta = format_cell(avg["vs_d0"], signed=True) if m != "d0" else "—"
        ref = e["reference_loss"]
        ref_delta = format_cell(ref["vs_d0"], signed=True) if m != "d0" else "—"
        epochs = e["compute_sft_epochs"]["mean"]
        steps = sorted(set(e.get("train_steps", [])))
        tokens = [t for t in e.get("train_tokens", []) if t is not None]
        lines.append(
            f"{m:<8} {format_cell(avg):>16} {delta:>20} {format_cell(ref):>16} {ref_delta:>20} "
            f"{epochs if epochs is not None else float('nan'):>10.1f} "
            f"{'/'.join(map(str, steps)):>6} "
            f"{(f'{np.mean(tokens):,.0f}' if tokens else '—'):>9} "
            f"{(e.get('chosen_on') or ['—'])[0]:>8}"
        )
    if comparison.get("ideal_vs"):
        lines.append("IDEAL − method, paired (average test score | dev ref loss):")
        for m, d in comparison["ideal_vs"].items():
            lines.append(
                f"  ideal − {m:<8} {format_cell(d['average'], signed=True):>20} "
                f"{format_cell(d['reference_loss'], signed=True):>20}"
            )
    lines.append("Δ per capability vs D0:")
    lines.append(f"{'method':<8} " + " ".join(f"{c:>18}" for c in caps))
    for m, e in methods.items():
        if m != "d0":
            cells = [format_cell(e["scores"][c]["vs_d0"], signed=True) for c in caps]
            lines.append(f"{m:<8} " + " ".join(f"{x:>18}" for x in cells))
    r = comparison["regret"]["average_score"]
    shares = ", ".join(
        f"{m} {s:+.0%}" for m, s in r["share_closed"].items() if s is not None and m != "d0"
    )
    lines.append(
        f"regret (average score): best = {r['best_method']} {r['best']:.3f}, D0 {r['d0']:.3f}, "
        f"gap {r['gap']:+.3f}" + (f"; share of the gap closed: {shares}" if shares else "")
    )
    if "note" in comparison:
        lines.append("note: " + comparison["note"])
    return "\n".join(lines)


def plot(comparison: dict[str, Any], path: str) -> None:
    """Left: average score per method (mean, 95% CI); right: Δ to D0 per capability (CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = comparison["methods"]
    names = list(methods)
    caps = [c for c in methods[names[0]]["scores"] if c != "average"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    means = [methods[m]["scores"]["average"]["mean"] for m in names]
    errs = [methods[m]["scores"]["average"]["ci95"] or 0.0 for m in names]
    axes[0].bar(names, means, yerr=errs, capsize=4, color="tab:blue")
    axes[0].set(title=f"average exact match ({len(comparison['seeds'])} seeds, 95% CI)")
    width = 0.8 / max(len(names) - 1, 1)
    x = np.arange(len(caps))
    for i, m in enumerate([m for m in names if m != "d0"]):
        d = [methods[m]["scores"][c]["vs_d0"] for c in caps]
        axes[1].bar(
            x + i * width,
            [e["mean"] for e in d],
            width,
            yerr=[e["ci95"] or 0.0 for e in d],
            capsize=2,
            label=m,
        )
    axes[1].axhline(0.0, color="black", linewidth=0.8)
    axes[1].set_xticks(x + width * (len(names) - 2) / 2, caps)
    axes[1].set(title="paired difference to D0 per capability (95% CI)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
