"""What the influence stage's subsample budget buys: its cost against one SFT epoch, and how well
its α agrees with the α of the whole data, over subsample seeds.

    PYTHONPATH=. python benchmarks/bench_alpha_budget.py                  # the settings below
    PYTHONPATH=. python benchmarks/bench_alpha_budget.py --seeds 0,1,2,3 --settings default,cap=128

One model (configs/demo.py: 28,000 examples, one SFT epoch from the base model) and one mixture
(D_0). The reference is the influence stage on every example for every pass (subsample = sigma,
σ = 1), computed twice with two seeds: with the true Fisher its two draws of sampled labels differ,
and their disagreement is the reference's own noise floor. Then, per budget setting and seed (the
seed draws the subsample), one influence call; its α (row "all") is compared with the reference's
(seed 0) by ideal_jax/step_agreement.py:

  cosine / max_dbeta / sign_agree   the paper rule's step from this α against the reference's
                                    (keep_total as the config says);
  coverage                          how often |α_j − α_ref_j| ≤ 1.96 s.e._j (the reported s.e.
                                    counts the gradient sample only: the curvature sample's
                                    error is not in it);
  ratio                             steady-state influence seconds / one SFT epoch's step seconds.

Settings are comma-separated; each is "default" or a "/"-joined list of curvature overrides:
ep=N (examples_per_domain), cap=N (max_examples_per_domain), t=X (alpha_se_target), sub=MODE
(subsample), sigma=X, est=fisher|empirical, damp=X, alloc=proportional|per_domain (how the
curvature sample is split over the domains). A setting that changes the estimator or the
damping is compared with a reference computed with the same change.

Every figure is a mean over seeds with a 95% t-interval; the same seed draws the same subsample in
every setting, so each setting's cosine and max|Δβ|/m are also compared with the first setting's,
paired by seed, when the two share a reference. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_influence  # noqa: E402
from ideal_jax import stats  # noqa: E402
from ideal_jax import step_agreement as agreement  # noqa: E402
from ideal_jax.influence import stage as influence_stage  # noqa: E402

SHORT = {
    "ep": "examples_per_domain",
    "cap": "max_examples_per_domain",
    "t": "alpha_se_target",
    "sub": "subsample",
    "sigma": "sigma",
    "est": "estimator",
    "damp": "damping",
    "alloc": "allocation",
}
# The reference's own settings are whatever a setting changes of these (the operator it measures).
OPERATOR_KEYS = ("est", "damp")
WHOLE = {"sub": "sigma", "ep": "0", "sigma": "1.0"}
DEFAULT_SETTINGS = "default,cap=256,cap=128,sub=fixed/ep=64,ep=128,cap=100000/t=0"


def parse_setting(text: str) -> dict[str, str]:
    """'cap=128/ep=32' -> {'cap': '128', 'ep': '32'}; 'default' -> {}."""
    if text == "default":
        return {}
    out = {}
    for part in text.split("/"):
        key, sep, value = part.partition("=")
        if not sep or key not in SHORT:
            raise SystemExit(
                f"bad setting {text!r}: {part!r} is not KEY=VALUE with KEY in {list(SHORT)}"
            )
        out[key] = value
    return out


def configured(cfg, overrides: dict[str, str], seed: int):
    """A copy of cfg with the curvature overrides (typed like the defaults) and the seed."""
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.seed = seed
        for key, value in overrides.items():
            field = SHORT[key]
            c.curvature[field] = type(c.curvature[field])(value)
    return c


def influence_call(cfg, model_cfg, params, suite, mix, mesh) -> dict:
    t0 = time.perf_counter()
    out = influence_stage.influence_from_config(cfg, model_cfg, params, suite, mix, mesh)
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "alpha": out.row("all"),
        "se": out.stderr_row("all"),
        "examples": out.subsample_examples,
    }


def summary(values) -> dict:
    s = stats.mean_ci(values)
    return {"mean": s["mean"], "ci95": s["ci95"], "n": s["n"]}


def fmt(s: dict, digits: int = 3) -> str:
    ci = "" if s["ci95"] is None else f" ± {s['ci95']:.{digits}f}"
    return f"{s['mean']:.{digits}f}{ci}"


def plot(result: dict, path: str) -> None:
    """Cost against agreement, one point per setting (mean ± 95% CI over seeds): the step's
    cosine to the whole data's, and the reported s.e.'s coverage, against the ratio to an epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "cosine", "cosine of the step to the whole data's step"),
        (axes[1], "coverage", "s.e. coverage: |α − α_ref| ≤ 1.96 s.e."),
    ):
        for row in result["settings"]:
            x, y = row["ratio"], row[key]
            ax.errorbar(
                x["mean"], y["mean"], xerr=x["ci95"] or 0, yerr=y["ci95"] or 0,
                marker="o", capsize=3,
            )  # fmt: skip
            ax.annotate(row["setting"], (x["mean"], y["mean"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")  # fmt: skip
        ax.set(xlabel="influence stage / one SFT epoch (steady state)", ylabel=label, xscale="log")
        ax.set_xticks([0.05, 0.1, 0.2, 0.5, 1.0], ["0.05", "0.1", "0.2", "0.5", "1"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].axvline(0.05, color="gray", lw=0.8, ls="--")
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[1].axhline(0.95, color="gray", lw=0.8, ls="--")
    fig.suptitle(f"subsample budgets, {len(result['seeds'])} seeds (95% CI); {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="subsample seeds")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="see the module docstring")
    parser.add_argument("--json", default="", help="also write the last line to this file")
    parser.add_argument("--plot", default="", help="also plot cost against agreement (PNG)")
    parser.add_argument(
        "--replot", default="", help="only plot this earlier --json file to --plot, and stop"
    )
    args = parser.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.plot or os.path.splitext(args.replot)[0] + ".png")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [(name, parse_setting(name)) for name in args.settings.split(",")]

    cfg = bench_influence.demo_config.get_config()
    with cfg.unlocked():
        cfg.progress = False
        cfg.train.epochs = 1
    with tempfile.TemporaryDirectory() as workdir:
        mesh, suite, model_cfg, mix, params, sft, _ = bench_influence.trained_d0(cfg, workdir)
        epoch_s = sft["train_seconds"]
        sizes, keep_total = list(mix.target_sizes), bool(cfg.reweight.keep_total)
        names = list(mix.domain_names)

        def call(overrides: dict, seed: int) -> dict:
            c = configured(cfg, overrides, seed)
            return influence_call(c, model_cfg, params, suite, mix, mesh)

        references: dict[tuple, dict] = {}

        def reference(overrides: dict) -> dict:
            key = tuple(sorted((k, v) for k, v in overrides.items() if k in OPERATOR_KEYS))
            if key not in references:
                o = dict(key) | WHOLE
                first, second = call(o, 0), call(o, 1)
                floor = agreement.step_agreement(first["alpha"], second["alpha"], sizes, keep_total)
                references[key] = {
                    "alpha": first["alpha"],
                    "se": first["se"],
                    "floor": floor,
                    "key": "/".join(f"{k}={v}" for k, v in key) or "default",
                }
                print(
                    f"reference {dict(key) or 'default operator'}: whole data ({first['examples']} "
                    f"examples) in {second['wall_s']:.2f} s; "
                    f"α = {np.round(first['alpha'], 3).tolist()}"
                    f"; a second draw: cosine {floor['cosine']:.4f}, max|Δβ|/m "
                    f"{floor['max_dbeta']:.4f}",
                    flush=True,
                )
            return references[key]

        rows = []
        print(f"one SFT epoch: {epoch_s:.2f} s of steps; domains {names}", flush=True)
        for name, overrides in settings:
            ref = reference(overrides)
            call(overrides, 10_000 + seeds[0])  # compiles what this setting's shapes need
            per_seed = []
            for seed in seeds:
                out = call(overrides, seed)
                agree = agreement.step_agreement(out["alpha"], ref["alpha"], sizes, keep_total)
                cover = agreement.se_coverage(out["alpha"], out["se"], ref["alpha"])
                per_seed.append(agree | {"coverage": cover} | out)
            row = {"setting": name, "overrides": overrides}
            for key in ("cosine", "max_dbeta", "sign_agree", "coverage"):
                row[key] = summary([p[key] for p in per_seed])
            row["ratio"] = summary([p["wall_s"] / epoch_s for p in per_seed])
            row["influence_s"] = summary([p["wall_s"] for p in per_seed])
            row["examples"] = summary([p["examples"] for p in per_seed])
            row["reference_floor"] = ref["floor"]
            row["per_seed"] = {k: [p[k] for p in per_seed] for k in ("cosine", "max_dbeta")}
            row["reference"] = ref["key"]
            # The same seeds draw the same subsamples: paired against the first setting, when both
            # are compared with the same reference (an estimator or damping change is not).
            if rows and rows[0]["reference"] == ref["key"]:
                first = rows[0]["per_seed"]
                row["vs_first"] = {
                    k: {
                        key: value
                        for key, value in stats.paired(row["per_seed"][k], first[k]).items()
                        if key != "per_seed"
                    }
                    for k in ("cosine", "max_dbeta")
                }
            rows.append(row)
            print(
                f"{name:24s} examples {row['examples']['mean']:7.0f}  ratio {fmt(row['ratio'])}  "
                f"cosine {fmt(row['cosine'])}  max|Δβ|/m {fmt(row['max_dbeta'])}  sign "
                f"{fmt(row['sign_agree'], 2)}  s.e. coverage {fmt(row['coverage'], 2)}"
                + (
                    f"  cosine − {rows[0]['setting']}: {fmt(row['vs_first']['cosine'])}"
                    f"{' (significant)' if row['vs_first']['cosine']['significant'] else ''}"
                    if "vs_first" in row
                    else ""
                ),
                flush=True,
            )
    line = json.dumps(
        {
            "sft_epoch_s": round(epoch_s, 3),
            "seeds": seeds,
            "domains": names,
            "settings": rows,
            "device": f"{jax.device_count()} {jax.default_backend()}",
        }
    )
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    if args.plot:
        plot(json.loads(line), args.plot)
    print(line)


if __name__ == "__main__":
    main()
