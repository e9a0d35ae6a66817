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
rerun of the command resumes where it stopped and reuses what is finished.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from ideal_jax import artifacts, configlib, ideal, summary
from ideal_jax import round as round_lib
from ideal_jax.compare import baselines, report
from ideal_jax.data import mixture as mixture_lib
from ideal_jax.utils import progress
from ideal_jax.utils.distributed import is_lead_host


def run_compare(cfg, workdir: str) -> dict[str, Any]:
    methods = configlib.parse_compare_methods(cfg)
    configlib.prepare_workdir(cfg, workdir)
    per_seed = []
    for s in range(cfg.seeds):
        seed = cfg.seed + s
        with progress.stage(f"compare seed {seed} ({s + 1}/{cfg.seeds})"):
            seed_cfg = ideal.seed_config(cfg, s, mode="ideal")
            per_seed.append(run_seed(seed_cfg, os.path.join(workdir, f"seed_{seed}"), methods))
    comparison = report.build(per_seed, methods, cfg)
    artifacts.write_json(os.path.join(workdir, "comparison.json"), comparison)
    report.plot(comparison, os.path.join(workdir, "comparison.png"))
    print(report.format_table(comparison))
    return comparison


# The paper's IDEAL (METHOD.md §1.2) as the ablation "ideal_paper": fixed m, every step kept.
PAPER_STEP_SIZE = 0.15
PAPER_ROUNDS = 2

# Training seeds of the runs a method reports after a selection (random's retrain) are shifted
# by this much: no selection run of any seed uses them.
FRESH_TRAIN_SEED_OFFSET = 10_007

# The split each method's choices read (README, comparison.json).
CHOSEN_ON = {
    "d0": "none",
    "uniform": "none",
    "ideal": "dev",
    "random": "dev",
    "regmix": "dev",
    "doremi": "train",
    "ideal_paper": "dev",
}


def _run_metrics(cfg, rdir: str, scores: dict, mix) -> dict[str, Any]:
    train_summary = os.path.join(rdir, "train", "summary.json")
    trained = artifacts.read_json(train_summary) if os.path.exists(train_summary) else {}
    return {
        "scores": summary.round_scores({"eval": scores}),
        "reference_loss": round_lib.reference_objective(scores, cfg),
        "volumes": dict(zip(mix.domain_names, map(int, mix.target_sizes))),
        "train_steps": int(trained.get("total_steps", 0)),
        "train_tokens": trained.get("tokens"),
        "train_loss_tokens": trained.get("loss_tokens"),
        "train_seed": int(cfg.train.seed),
        "dir": rdir,
    }


def _round_metrics(cfg, loop_dir: str, loop: dict[str, Any], k: int) -> dict[str, Any]:
    """The metrics of round k of a finished IDEAL loop in `loop_dir` (its summary `loop`)."""
    rdir = os.path.join(loop_dir, f"round_{k}")
    mix = mixture_lib.read_manifest(os.path.join(rdir, "mixture.json"))
    return _run_metrics(cfg, rdir, loop["rounds"][k]["eval"], mix)


def _train_seconds(rdir: str) -> float:
    path = os.path.join(rdir, "timings.json")
    return float(artifacts.read_json(path).get("train", 0.0)) if os.path.exists(path) else 0.0


def run_seed(cfg, sdir: str, methods: tuple[str, ...]) -> dict[str, Any]:
    """Every method for one seed; returns {method: metrics} plus the seed's compute figures."""
    os.makedirs(sdir, exist_ok=True)
    run = ideal.load_run(cfg, sdir)
    mesh, suite, model_cfg, base_params = run.mesh, run.suite, run.model_cfg, run.base_params
    d0_ids = run.d0_ids
    names = list(d0_ids)
    total = sum(len(v) for v in d0_ids.values())
    epochs = max(int(cfg.train.epochs), 1)
    results: dict[str, Any] = {}

    def train_on(name: str, weights, train_seed_offset: int = 0) -> tuple[dict[str, Any], Any]:
        """Train and evaluate the mixture with proportions `weights` in SDIR/name."""
        rdir = os.path.join(sdir, name)
        os.makedirs(rdir, exist_ok=True)
        mix = baselines.mixture_from_weights(
            d0_ids, weights, total, cfg.seed, pools=run.pools, upsample=cfg.data.upsample
        )
        mix_path = os.path.join(rdir, "mixture.json")
        mix = artifacts.cached(
            mix_path,
            lambda: mix,
            inputs=run.stage_inputs("compare"),
            load=mixture_lib.read_manifest,
            save=lambda path, m: is_lead_host() and mixture_lib.write_manifest(m, path),
        )
        method_run = run
        if train_seed_offset:
            seed = int(cfg.train.seed) + train_seed_offset
            method_run = ideal.rebind(run, configlib.derived(cfg, {"train.seed": seed}))
        timer = artifacts.Timer(os.path.join(rdir, "timings.json"))
        with progress.stage(name):
            params, scores = round_lib.train_and_evaluate(method_run, rdir, timer, base_params, mix)
        return _run_metrics(method_run.cfg, rdir, scores, mix), params

    # IDEAL: D0 is its round 0; the method "ideal" is its last round (D_rounds).
    # The method "ideal" is the loop's result: the step policy's best accepted round (the last
    # round with policy = fixed); every round it trained counts in its compute, rejected or not.
    ideal_dir = os.path.join(sdir, "ideal")
    ideal_run = ideal.run_ideal(cfg, ideal_dir, loaded=run)
    best = int(ideal_run["result_round"])
    results["d0"] = _round_metrics(cfg, ideal_dir, ideal_run, 0)
    results["ideal"] = _round_metrics(cfg, ideal_dir, ideal_run, best)
    results["ideal"]["rounds_trained"] = len(ideal_run["rounds"])
    results["ideal"]["result_round"] = best
    epoch_s = _train_seconds(os.path.join(ideal_dir, "round_0")) / epochs or float("nan")

    def loop_compute(loop) -> float:
        influence_s = sum(float(r.get("timings", {}).get("influence", 0.0)) for r in loop["rounds"])
        return len(loop["rounds"]) * epochs + influence_s / epoch_s

    compute = {"d0": epochs, "ideal": loop_compute(ideal_run)}
    if "ideal_paper" in methods:  # the paper's fixed step as an ablation: m = 0.15, 2 rounds
        paper_cfg = configlib.derived(
            cfg,
            {
                "reweight.policy": "fixed",
                "reweight.step_size": PAPER_STEP_SIZE,
                "rounds": PAPER_ROUNDS,
            },
        )
        paper_dir = os.path.join(sdir, "ideal_paper")
        with progress.stage("ideal_paper"):
            paper = ideal.run_ideal(paper_cfg, paper_dir, loaded=ideal.rebind(run, paper_cfg))
        results["ideal_paper"] = _round_metrics(
            paper_cfg, paper_dir, paper, int(paper["result_round"])
        )
        compute["ideal_paper"] = loop_compute(paper)
    weights_seen: list[tuple[np.ndarray, float]] = [
        (_proportions(results["d0"]["volumes"], names), results["d0"]["reference_loss"])
    ]
    needs_uniform = {"uniform", "doremi"} & set(methods)
    uniform_params = None
    if needs_uniform:
        results["uniform"], uniform_params = train_on(
            "uniform", baselines.uniform_weights(len(names))
        )
        compute["uniform"] = epochs
        weights_seen.append(
            (baselines.uniform_weights(len(names)), results["uniform"]["reference_loss"])
        )
    if {"random", "regmix"} & set(methods):
        k = int(cfg.compare.k)
        draws = baselines.dirichlet_weights(
            k, len(names), cfg.seed, cfg.compare.dirichlet_concentration
        )
        runs = [train_on(f"random_{i}", w)[0] for i, w in enumerate(draws)]
        weights_seen += [(w, r["reference_loss"]) for w, r in zip(draws, runs)]
        # Chosen on the dev reference loss; the score it reports is a retraining of the chosen
        # mixture with a fresh training seed (the selection run's own score is biased upwards).
        best = int(np.argmin([r["reference_loss"] for r in runs]))
        if "random" in methods:
            results["random"], _ = train_on(
                "random", draws[best], train_seed_offset=FRESH_TRAIN_SEED_OFFSET
            )
            results["random"].update(
                chosen=best,
                selection_reference_losses=[r["reference_loss"] for r in runs],
                selection_train_seed=int(cfg.train.seed),
            )
            compute["random"] = (k + 1) * epochs
        if "regmix" in methods:
            fit = baselines.fit_regmix(
                np.stack([w for w, _ in weights_seen]), np.array([y for _, y in weights_seen])
            )
            proposal = baselines.propose_regmix(
                fit,
                len(names),
                cfg.seed,
                cfg.compare.dirichlet_concentration,
                int(cfg.compare.regmix_candidates),
                int(cfg.compare.regmix_top),
            )
            results["regmix"], _ = train_on("regmix", proposal)
            predicted = float(baselines.predict_regmix(fit, proposal[None])[0])
            results["regmix"]["regression"] = dict(fit, predicted_reference_loss=predicted)
            compute["regmix"] = k * epochs + epochs
    if "doremi" in methods:
        from ideal_jax.compare import doremi

        proxy_dir = os.path.join(sdir, "doremi", "proxy")
        uniform_mix = mixture_lib.read_manifest(os.path.join(sdir, "uniform", "mixture.json"))
        timer = artifacts.Timer(os.path.join(sdir, "doremi", "proxy_timings.json"))
        with progress.stage("doremi"):
            found = timer.run(
                "doremi_proxy",
                doremi.doremi_weights,
                cfg,
                model_cfg,
                mesh,
                suite,
                uniform_mix,
                base_params,
                uniform_params,
                proxy_dir,
            )
        weights = np.array([found["weights"][n] for n in names])
        results["doremi"], _ = train_on("doremi", weights)
        results["doremi"]["doremi_weights"] = found["weights"]
        proxy_s = float(timer.times.get("doremi_proxy", 0.0))
        compute["doremi"] = 2 * epochs + proxy_s / epoch_s
    if "uniform" not in methods:
        results.pop("uniform", None)
    for method, value in compute.items():
        if method in results:
            results[method]["compute_sft_epochs"] = float(value)
    for method in results:
        results[method]["chosen_on"] = CHOSEN_ON.get(method, "dev")
    logging.info("compare %s: %s", os.path.basename(sdir), sorted(results))
    return {"methods": results, "seed": int(cfg.seed), "sft_epoch_s": epoch_s}


def _proportions(volumes: dict[str, int], names: list[str]) -> np.ndarray:
    v = np.array([volumes[n] for n in names], dtype=np.float64)
    return v / v.sum()
