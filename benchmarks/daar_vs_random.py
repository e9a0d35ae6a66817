"""DaaR selection vs a random selection of the same size, on the demo suite, over seeds.

    python benchmarks/daar_vs_random.py --seeds 2 --workdir /tmp/daar_vs_random

For each seed: run DaaR on the demo pool (labels hidden), train the tiny model on its selection
and on a uniformly random subset of the same size (same training budget in steps), and score both
on the demo's held-out test split. Prints per-capability exact match and the mean ± std.

benchmarks/daar_selection.py is the fuller comparison (a pool where DaaR's premise holds, DaaR
top-fraction / per-domain, random and k-center, paired 95% intervals over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import daar_demo  # noqa: E402
from ideal_jax import main, sharding, summary  # noqa: E402
from ideal_jax.data import mixture  # noqa: E402
from ideal_jax.data import suite as suite_lib  # noqa: E402
from ideal_jax.evaluate import stage as evaluate_stage  # noqa: E402
from ideal_jax.model import loading  # noqa: E402
from ideal_jax.train import stage as train_stage  # noqa: E402


def train_and_score(cfg, workdir: str, suite, model_cfg, params, mesh, ids: list[str]) -> dict:
    """SFT on exactly these example ids (grouped by their true domain), then the demo eval."""
    by_domain: dict[str, list[str]] = {name: [] for name in suite.domain_names}
    for example_id in ids:
        by_domain[example_id.split(":")[0]].append(example_id)
    mix = mixture.build_mixture(by_domain, None, seed=cfg.seed)
    os.makedirs(workdir, exist_ok=True)
    final = train_stage.train_round(
        cfg.train, cfg.data, model_cfg, mesh, workdir, suite, mix, params
    )
    scores = evaluate_stage.evaluate_round(
        cfg.eval,
        model_cfg,
        final,
        suite,
        mesh,
        seed=cfg.seed,
        loss_batch_size=cfg.influence.batch_size,
        seq_len=cfg.train.seq_len,
    )
    return summary.round_scores({"eval": scores})


def main_(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/daar_vs_random")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    rows = {"daar": [], "random": []}
    for seed in range(args.seeds):
        cfg = daar_demo.get_config()
        cfg.unlock()
        cfg.seed, cfg.daar.seed, cfg.train.seed, cfg.progress = seed, seed, seed, False
        cfg.train.epochs = args.epochs  # 20% of the data: more epochs for a comparable budget
        workdir = os.path.join(args.workdir, f"seed_{seed}")
        out = main.run(cfg, workdir)  # mode=daar: the selection
        manifest = json.load(open(out["manifest"]))
        chosen = [s["id"] for s in manifest["selected"]]
        mesh = sharding.make_mesh(dict(cfg.mesh))
        suite = suite_lib.load_suite(cfg, workdir)
        model_cfg, params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
        pool = [t.example_id for name in suite.domain_names for t in suite.tokenized[name]]
        random_ids = list(np.random.default_rng(seed).choice(pool, len(chosen), replace=False))
        for name, ids in (("daar", chosen), ("random", random_ids)):
            scores = train_and_score(
                cfg, os.path.join(workdir, f"sft_{name}"), suite, model_cfg, params, mesh, ids
            )
            rows[name].append(scores)
            print(
                f"seed {seed} {name:>6}: "
                + json.dumps({k: round(v, 3) for k, v in scores.items()}),
                flush=True,
            )
    print("\nselection   " + "  ".join(f"{c:>14}" for c in rows["daar"][0]))
    for name, results in rows.items():
        cells = []
        for cap in results[0]:
            values = [r[cap] for r in results]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}")
        print(f"{name:<10}  " + "  ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main_()
