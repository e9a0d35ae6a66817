"""How far can α's step go? One step from the same D0 at several step sizes m, retrained.

    python benchmarks/step_sweep.py --from runs/compare_v3 --seeds 0,1,2 \\
        --steps 0.05,0.15,0.3,0.5,1.0 --workdir runs/step_sweep

For every seed S it reuses the finished round 0 of a comparison's IDEAL loop
(FROM/seed_S/ideal/round_0: D0, its trained model's α on the dev reference set and its dev
reference loss J0), takes the paper rule's step β = m · d / max|d| from D0 for each m (keep-total
direction d; the volumes as the product realises them; growing domains draw fresh examples of
their source first), retrains from the base model with the run's own training seed and budget
(the same number of optimizer steps as D0), and measures the dev objective J(m) (reference loss
on the dev split) and the average test exact match. Per step size it reports, over seeds:

  predicted  α · β (first order in the step as applied)
  measured   J(m) − J0
  ratio      measured / predicted, and whether the sign of the change matched the prediction
  test Δ     average test exact match minus D0's

with 95% t intervals over seeds (paired: every m shares its seed's D0). Choices read the dev split
only; the test column is reported, never used. Each training is an ordinary round directory
(WORKDIR/seed_S/m_M/: resumable). The figure (WORKDIR/step_sweep.png): predicted and measured
change against m. The last line of stdout is one JSON object with every figure.
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
    parser.add_argument("--from", dest="source", required=True, help="a mode=compare workdir")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of FROM")
    parser.add_argument("--steps", default="0.05,0.15,0.3,0.5,1.0", help="step sizes m")
    parser.add_argument("--workdir", default="runs/step_sweep")
    return parser.parse_args(argv)


def sweep_seed(source: str, seed: int, steps: list[float], workdir: str) -> list[dict]:
    import dataclasses

    import ml_collections

    from configs import common
    from ideal_jax import artifacts, ideal, reweight, summary
    from ideal_jax import round as round_lib
    from ideal_jax.configlib.fields import flat_fields
    from ideal_jax.data import mixture as mixture_lib

    seed_dir = os.path.join(source, f"seed_{seed}")
    # The comparison's config over today's defaults (a field it predates keeps its default).
    cfg = common.base_config()
    saved = artifacts.read_json(os.path.join(source, "config.json"))
    for key, value in flat_fields(saved).items():
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    cfg.reweight.policy = "fixed"  # single steps of the paper rule at each m; no policy
    cfg = ideal.seed_config(cfg, seed - int(cfg.seed), mode="ideal")
    round0 = os.path.join(seed_dir, "ideal", "round_0")
    d0 = mixture_lib.read_manifest(os.path.join(round0, "mixture.json"))
    influence = round_lib._read_influence(os.path.join(round0, "influence.json"))
    alpha = influence.row("all")
    scores0 = artifacts.read_json(os.path.join(round0, "eval.json"))
    j0 = round_lib.reference_objective(scores0, cfg)
    test0 = summary.round_scores({"eval": scores0}).get("average")
    run = ideal.load_run(cfg, os.path.join(workdir, f"seed_{seed}"))
    out = []
    for m in steps:
        step_cfg = dataclasses.replace(run.reweight_cfg, step_size=float(m))
        step = reweight.compute_step(alpha, d0.target_sizes, step_cfg)
        mix = mixture_lib.resample_from(
            d0,
            step.volumes_after,
            seed=cfg.seed + 1,
            beta_nominal=step.beta_nominal,
            pools=run.pools if d0.pool_sizes else None,
            upsample=cfg.data.upsample,
        )
        rdir = os.path.join(run.workdir, f"m_{m:g}")
        os.makedirs(rdir, exist_ok=True)
        mixture_lib.write_manifest(mix, os.path.join(rdir, "mixture.json"))
        timer = artifacts.Timer(os.path.join(rdir, "timings.json"))
        _, scores = round_lib.train_and_evaluate(run, rdir, timer, run.base_params, mix)
        j = round_lib.reference_objective(scores, cfg)
        test = summary.round_scores({"eval": scores}).get("average")
        predicted = float(np.dot(alpha, step.beta_applied))
        out.append(
            {
                "seed": seed,
                "m": float(m),
                "predicted": predicted,
                "measured": float(j - j0),
                "j0": float(j0),
                "j": float(j),
                "test_delta": float(test - test0),
                "volumes": dict(zip(d0.domain_names, map(int, step.volumes_after))),
            }
        )
        print(
            f"seed {seed} m {m:<5g} predicted {predicted:+.4f} measured {j - j0:+.4f} "
            f"test Δ {test - test0:+.3f}",
            flush=True,
        )
    return out


def aggregate(rows: list[dict], steps: list[float]) -> list[dict]:
    from ideal_jax import stats

    table = []
    for m in steps:
        at = [r for r in rows if r["m"] == float(m)]
        pred = [r["predicted"] for r in at]
        meas = [r["measured"] for r in at]
        table.append(
            {
                "m": float(m),
                "n": len(at),
                "predicted": stats.mean_ci(pred),
                "measured": stats.mean_ci(meas),
                "measured_minus_predicted": stats.paired(meas, pred),
                "sign_agrees": int(sum(np.sign(a) == np.sign(b) for a, b in zip(pred, meas))),
                "ratio_median": float(np.median([b / a for a, b in zip(pred, meas) if a]))
                if any(pred)
                else None,
                "test_delta": stats.mean_ci([r["test_delta"] for r in at]),
            }
        )
    return table


def plot(table: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = [t["m"] for t in table]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))

    # Measured and predicted on their own axes: "paper" scaling omits |D_j|/N, so only the sign
    # and the shape of the prediction are comparable, not its magnitude.
    def errorbar(ax, key: str, **style):  # mean ± 95% CI over seeds, per step size
        ax.errorbar(
            m,
            [t[key]["mean"] for t in table],
            yerr=[t[key]["ci95"] or 0 for t in table],
            marker="o",
            capsize=3,
            **style,
        )

    errorbar(axes[0], "measured", color="tab:orange", label="measured ΔJ (retrained), left axis")
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set(xlabel="step size m", ylabel="measured change of the dev reference loss")
    axes[0].set_xscale("log")
    twin = axes[0].twinx()
    twin.plot(m, [t["predicted"]["mean"] for t in table], "s--", color="tab:blue")
    twin.set_ylabel("predicted α·β (mean over seeds)", color="tab:blue")
    axes[0].legend(loc="lower left", fontsize=8)
    errorbar(axes[1], "test_delta", color="tab:green")
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[1].set(xlabel="step size m", ylabel="Δ average test exact match vs D0", xscale="log")
    fig.suptitle("one step from D0 (95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    steps = [float(m) for m in args.steps.split(",") if m.strip()]
    os.makedirs(args.workdir, exist_ok=True)
    rows = []
    for seed in seeds:
        rows += sweep_seed(args.source, seed, steps, args.workdir)
    table = aggregate(rows, steps)
    for t in table:
        print(
            f"m {t['m']:<5g} predicted {t['predicted']['mean']:+.4f} ± "
            f"{t['predicted']['ci95'] or 0:.4f}  measured {t['measured']['mean']:+.4f} ± "
            f"{t['measured']['ci95'] or 0:.4f}  sign agrees {t['sign_agrees']}/{t['n']}  "
            f"test Δ {t['test_delta']['mean']:+.3f} ± {t['test_delta']['ci95'] or 0:.3f}"
        )
    plot(table, os.path.join(args.workdir, "step_sweep.png"))
    result = {"source": args.source, "seeds": seeds, "steps": steps, "rows": rows, "table": table}
    with open(os.path.join(args.workdir, "step_sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
