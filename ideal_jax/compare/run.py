"""mode=compare: IDEAL and the baselines, trained at equal volume, paired over seeds.

    python -m ideal_jax.main --config configs/demo.py:seeds=5 --config.mode=compare --workdir W

For every seed s (seed = cfg.seed + s, train.seed = cfg.train.seed + s; the demo suite is drawn
with that seed too) one initialisation is shared by every method, and each method's final
mixture is trained with the same training seed, the same total number of examples as D0, the
same number of optimizer steps (train.budget = d0_steps) and the same schedule. A domain that
grows past D0 draws what data.upsample says, for every method alike (fresh examples of its
source first, by default).

Which split each method reads: the reference set is the dev split (on the demo, rows disjoint
from the test rows); every choice — IDEAL's α, random's best-of-k, RegMix's regression — is made
on it; scores are on the test split only. DoReMi chooses on training losses.

  W/seed_S/ideal/            the IDEAL loop (round_0 is the method "d0", the last round "ideal")
  W/seed_S/uniform/          the uniform mixture
  W/seed_S/random_I/         k Dirichlet mixtures (I = 0..k-1), trained for selection only;
                             "regmix" fits its regression on all of these runs
  W/seed_S/random/           the best of them on the dev reference loss, retrained with a fresh
                             training seed: the run "random" reports (no winner's curse); its
                             compute counts the k selection runs
  W/seed_S/regmix/           RegMix's proposal
  W/seed_S/doremi/           DoReMi's weights (doremi/proxy/doremi.json) trained like the others
  W/comparison.json          per method: mean ± 95% CI of the average and of every capability,
                             the paired difference to D0 with its CI and significance, the
                             reference loss, the compute in SFT-epoch equivalents, the regret
  W/comparison.png           the same, plotted

Every run is an ordinary round directory (train/ checkpoints, eval.json, provenance), so a
rerun of the command resumes where it stopped and reuses what is finished. The methods themselves,
by name: ideal_jax/compare/methods.py (METHODS).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ideal_jax import artifacts, ideal
from ideal_jax.compare import report
from ideal_jax.compare.config import CompareConfig
from ideal_jax.compare.methods import SeedRun, run_methods
from ideal_jax.reweight import ReweightConfig
from ideal_jax.utils import progress


def run_compare(cfg, workdir: str) -> dict[str, Any]:
    """Every method of cfg.compare.methods for cfg.seeds seeds → WORKDIR/comparison.json, .png
    (WORKDIR/config.json is the caller's: ideal_jax/main.py prepares every workdir)."""
    settings = CompareConfig.from_config_dict(cfg.compare)
    per_seed = []
    for s in range(cfg.seeds):
        seed = cfg.seed + s
        with progress.stage(f"compare seed {seed} ({s + 1}/{cfg.seeds})"):
            seed_cfg = ideal.seed_config(cfg, s, mode="ideal")
            sdir = os.path.join(workdir, f"seed_{seed}")
            per_seed.append(run_seed(seed_cfg, sdir, settings.methods))
    reweight_cfg = ReweightConfig.from_config_dict(cfg.reweight)
    comparison = report.build(per_seed, cfg, settings, reweight_cfg)
    artifacts.write_json(os.path.join(workdir, "comparison.json"), comparison)
    report.plot(comparison, os.path.join(workdir, "comparison.png"))
    print(report.format_table(comparison))
    return comparison


def run_seed(cfg, sdir: str, methods: tuple[str, ...]) -> dict[str, Any]:
    """Every method for one seed; returns {method: metrics} plus the seed's compute figures."""
    os.makedirs(sdir, exist_ok=True)
    seed_run = SeedRun(cfg=cfg, sdir=sdir, run=ideal.load_run(cfg, sdir))
    results = run_methods(seed_run, methods)
    logging.info("compare %s: %s", os.path.basename(sdir), sorted(results))
    return {"methods": results, "seed": int(cfg.seed), "sft_epoch_s": seed_run.epoch_s}
