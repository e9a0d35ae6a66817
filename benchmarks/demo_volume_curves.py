"""Accuracy against training volume for each capability of the demo suite, over seeds.

    PYTHONPATH=. python benchmarks/demo_volume_curves.py [--volumes 100,200,400,800]
        [--seeds 3] [--d0 [--d0-seeds 5]] [--config configs/demo.py] [--workdir /tmp/curves]
        [--plot docs/demo_volume_curves.png]

For each volume v every capability gets v training examples (the harmful domain none), trained
with the demo's schedule (epochs fixed, so more volume = more steps) from the seed's
initialisation; the test accuracy of each capability is reported as mean ± 95% CI over seeds.
A capability whose accuracy rises smoothly with v (and whose CI is narrow) is one where the
mixture matters; a flat one is saturated or unlearnable at this model size. Also prints the
per-capability seed std at the demo's own D0 volumes (--d0, over --d0-seeds seeds). Writes the plot
to --plot (default curves.png in the workdir). Each run's wall time is printed and kept.
Last line: one JSON object {"volumes": [...], "curves": {capability: [{mean, ci95}, ...]}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ideal_jax import main, stats  # noqa: E402
from ideal_jax.configlib.loading import load_config_spec  # noqa: E402
from ideal_jax.data import demo_suite  # noqa: E402


def train_scores(base, sizes: dict[str, int], seed: int, workdir: str) -> dict[str, float]:
    cfg = type(base)(base.to_dict())
    cfg.mode, cfg.seed, cfg.train.seed, cfg.progress = "sft", seed, seed, False
    cfg.export.final_model = False
    cfg.data.demo_train_sizes = sizes
    start = time.perf_counter()
    scores = main.run(cfg.lock(), workdir)["scores"][0]
    wall = time.perf_counter() - start
    print(f"  seed {seed} {sizes}: {wall:.0f} s  " + json.dumps(scores), flush=True)
    return dict(scores, wall_s=wall)


def main_(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--volumes", default="100,200,400,800")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--d0", action="store_true", help="also the seed spread at D0's volumes")
    parser.add_argument("--d0-seeds", type=int, default=5, help="seeds for --d0")
    parser.add_argument("--plot", default=None, help="plot path (default WORKDIR/curves.png)")
    parser.add_argument("--workdir", default="/tmp/demo_volume_curves")
    args = parser.parse_args(argv)
    base = load_config_spec(args.config)
    volumes = [int(v) for v in args.volumes.split(",")]
    caps = [c for c in demo_suite.CAPABILITIES if base.data.demo_train_sizes.get(c, 0) > 0]
    curves: dict[str, list] = {c: [] for c in caps}
    walls: list[list[float]] = []
    for v in volumes:
        runs = [
            train_scores(
                base,
                {c: v for c in caps},
                s,
                os.path.join(args.workdir, f"v{v}_s{s}"),
            )
            for s in range(args.seeds)
        ]
        for c in caps:
            curves[c].append(stats.mean_ci([r[c] for r in runs]))
        walls.append([r["wall_s"] for r in runs])
        print(
            f"volume {v:>5}: " + "  ".join(f"{c} {curves[c][-1]['mean']:.2f}" for c in caps),
            flush=True,
        )
    out = {"volumes": volumes, "seeds": args.seeds, "curves": curves, "wall_s": walls}
    if args.d0:
        sizes = dict(base.data.demo_train_sizes)
        runs = [
            train_scores(base, sizes, s, os.path.join(args.workdir, f"d0_s{s}"))
            for s in range(args.d0_seeds)
        ]
        out["d0_sizes"], out["d0_seeds"] = sizes, args.d0_seeds
        out["d0"] = {c: stats.mean_ci([r[c] for r in runs]) for c in [*caps, "average"]}
        out["d0_runs"] = runs
        for c, e in out["d0"].items():
            print(f"D0 {c:>12}: {e['mean']:.3f}  seed std {e['std']:.3f}", flush=True)
    _plot(out, args.plot or os.path.join(args.workdir, "curves.png"))
    print(json.dumps(out))
    return out


def _plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for c, points in out["curves"].items():
        means = np.array([p["mean"] for p in points])
        errs = np.array([p["ci95"] or 0.0 for p in points])
        ax.errorbar(out["volumes"], means, yerr=errs, marker="o", capsize=3, label=c)
    ax.set(xscale="log", xlabel="training examples per capability", ylabel="test exact match")
    ax.set_title(f"demo: accuracy vs volume ({out['seeds']} seeds, 95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main_()
