"""summary.json and summary.png: one row per round, and a plot of volumes and scores across rounds.

Also the aggregation of several seeds (mean ± std per round and capability) for the demo.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ideal_jax.reweight import ReweightConfig
from ideal_jax.step_policy import PolicyConfig
from ideal_jax.utils.atomic import atomic_path, write_json_atomic
from ideal_jax.utils.distributed import is_lead_host


def mixture_row(mix) -> dict[str, Any]:
    return {
        name: {"source": int(src), "target": int(tgt)}
        for name, src, tgt in zip(mix.domain_names, mix.source_sizes, mix.target_sizes)
    }


def round_scores(row: dict[str, Any]) -> dict[str, float]:
    """Per-capability accuracy of a round (demo task, or each benchmark's primary metric)."""
    tasks = row["eval"].get("tasks", {})
    if "demo" in tasks and "per_capability" in tasks["demo"]:
        scores = dict(tasks["demo"]["per_capability"])
        scores["average"] = float(np.mean(list(scores.values()))) if scores else float("nan")
        return scores
    # "dev" scores the reference rows for the step policy (accept_on = dev_score): not a test.
    scores = {name: t["primary"] for name, t in tasks.items() if "primary" in t and name != "dev"}
    if row["eval"].get("average") is not None:
        scores["average"] = row["eval"]["average"]
    return scores


def write_summary(
    workdir: str,
    cfg,
    rows: list[dict[str, Any]],
    result_round: int | None = None,
    *,
    reweight_cfg: ReweightConfig,
    policy_cfg: PolicyConfig,
) -> dict[str, Any]:
    """summary.json (+ summary.png). result_round: the round whose mixture is the result (the
    step policy's best accepted one; final_mixture.jsonl and final_model/ are that round's).
    The reweight settings come from the run's typed configs, the others from `cfg`."""
    result = {
        "result_round": rows[-1]["round"] if result_round is None else int(result_round),
        "rounds": rows,
        "scores": [round_scores(r) for r in rows],
        "reference_loss": [r["eval"].get("reference_loss", {}) for r in rows],
        "settings": {
            "operator": cfg.influence.operator,
            "scaling": cfg.influence.scaling,
            "update_rule": reweight_cfg.rule,
            "step_size": policy_cfg.step_size,
            "step_policy": policy_cfg.policy,
            "keep_total": reweight_cfg.keep_total,
            "sigma": cfg.curvature.sigma,
            "layers": cfg.curvature.layers,
            "damping": cfg.curvature.damping,
            "relative_damping": cfg.curvature.relative_damping,
            "seed": cfg.seed,
            "warm_start": cfg.train.warm_start,
        },
    }
    if is_lead_host():
        write_json_atomic(os.path.join(workdir, "summary.json"), result)
        plot_rounds(result, os.path.join(workdir, "summary.png"))
    return result


def plot_rounds(result: dict[str, Any], path: str, title: str = "IDEAL rounds") -> None:
    """Three panels: domain volumes, per-capability scores, and α, across rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rounds"]
    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    domains = list(rows[0]["mixture"])
    bottom = np.zeros(len(rows))
    for name in domains:
        vols = np.array([r["mixture"][name]["target"] for r in rows], float)
        axes[0].bar(rounds, vols, bottom=bottom, label=plot_label(name))
        bottom += vols
    axes[0].set(
        title="training volume per domain", xlabel="round (D_k)", ylabel="examples", xticks=rounds
    )
    axes[0].legend(fontsize=8)
    scores = result["scores"]
    for cap in scores[0]:
        ys = [s.get(cap, np.nan) for s in scores]
        style = dict(lw=3, color="black") if cap == "average" else {}
        axes[1].plot(rounds, ys, marker="o", label=plot_label(cap), **style)
    axes[1].set(
        title="score per capability", xlabel="round (D_k)", ylabel="accuracy", xticks=rounds
    )
    axes[1].legend(fontsize=8)
    with_alpha = [r for r in rows if "alpha" in r]
    width = 0.8 / max(len(with_alpha), 1)
    for i, r in enumerate(with_alpha):
        stderr = r.get("alpha_stderr")
        axes[2].bar(
            np.arange(len(domains)) + i * width,
            [r["alpha"][d] for d in domains],
            width=width,
            yerr=None if stderr is None else [2 * stderr[d] for d in domains],  # ±2 s.e.
            capsize=2,
            label=f"α round {r['round']}",
        )
    axes[2].axhline(0, color="gray", lw=0.8)
    axes[2].set_xticks(
        np.arange(len(domains)) + width * (len(with_alpha) - 1) / 2,
        [plot_label(d) for d in domains],
        rotation=20,
    )
    axes[2].set(title="α = ∂Q/∂β ± 2 s.e. (negative: add data)")
    if with_alpha:  # mode=sft has no influence rounds
        axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # savefig reads the format from the name
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def aggregate_seeds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± 95% CI over seeds of every round's per-capability scores, and each round's paired
    difference to D0 (the same seed's round 0) with its CI and significance (ideal_jax/stats.py)."""
    from ideal_jax import stats

    n_rounds = len(results[0]["scores"])
    table = []
    for k in range(n_rounds):
        caps = results[0]["scores"][k].keys()
        row = {}
        for cap in caps:
            values = [r["scores"][k][cap] for r in results]
            row[cap] = {
                **stats.mean_ci(values),
                "values": values,
                "vs_d0": stats.paired(values, [r["scores"][0][cap] for r in results]),
            }
        table.append(row)
    return {"seeds": len(results), "scores": table}


def format_table(
    scores: list[dict[str, Any]], reference_loss: list[dict[str, float]] | None = None
) -> str:
    """A plain-text table: rows = rounds, columns = capabilities.

    Aggregated over seeds: mean ± 95% CI per round, then each round's paired difference to D0
    (* where its CI excludes 0). One seed: the scores, and a line saying that they cannot
    separate an effect from training noise. A run without evaluation tasks has no scores: the
    table then shows the reference losses per round (`reference_loss`), or says that there are
    none.
    """
    caps = list(scores[0]) if scores else []
    if not caps:
        return _reference_loss_table(reference_loss or [])
    lines = ["round  " + "  ".join(f"{label_text(c):>16}" for c in caps)]
    aggregated = isinstance(scores[0][caps[0]], dict)
    for k, row in enumerate(scores):
        cells = []
        for c in caps:
            v = row[c]
            if aggregated:
                ci = v.get("ci95")
                cells.append(f"{v['mean']:.3f}" + (f" ± {ci:.3f}" if ci is not None else ""))
            else:
                cells.append(f"{v:.3f}")
        lines.append(f"D{k:<5} " + "  ".join(f"{x:>16}" for x in cells))
    if aggregated:
        lines.append("paired difference to D0 (same seed), 95% CI; * = significant:")
        for k, row in enumerate(scores[1:], start=1):
            cells = []
            for c in caps:
                d = row[c]["vs_d0"]
                ci = f" ± {d['ci95']:.3f}" if d["ci95"] is not None else ""
                cells.append(f"{d['mean']:+.3f}{ci}" + (" *" if d["significant"] else ""))
            lines.append(f"D{k}-D0  " + "  ".join(f"{x:>16}" for x in cells))
    else:
        lines.append(
            "one seed: round-to-round differences here cannot be separated from training noise "
            "(retraining the same mixture with another seed moves single capabilities by more); "
            "for confidence intervals run with seeds, e.g. --config configs/demo.py:seeds=5, and "
            "for baselines at equal volume add --config.mode=compare"
        )
    return "\n".join(lines)


def _reference_loss_table(losses: list[dict[str, float]]) -> str:
    note = "no evaluation scores (no eval tasks: cfg.eval.demo is off and cfg.eval.tasks is empty)"
    caps = list(losses[0]) if losses else []
    if not caps:
        return note
    lines = [note + "; reference loss per capability (lower is better):"]
    lines.append("round  " + "  ".join(f"{label_text(c):>16}" for c in caps))
    for k, row in enumerate(losses):
        cells = [f"{row[c]:.4f}" if row.get(c) is not None else "-" for c in caps]
        lines.append(f"D{k:<5} " + "  ".join(f"{x:>16}" for x in cells))
    return "\n".join(lines)


def label_text(name: str) -> str:
    """A domain or capability name as table or plot text: printable (a lone surrogate or a
    control character escaped, as Python writes it)."""
    text = str(name).encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def plot_label(name: str) -> str:
    """`label_text`, with $ escaped: matplotlib parses $...$ as mathtext, and a name such as
    "$^$" is a mathtext syntax error that would stop summary.png (and what follows it)."""
    text = label_text(name).replace("$", r"\$")
    return " " + text if text.startswith("_") else text  # legends skip labels starting with _
