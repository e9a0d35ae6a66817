"""The methods mode=compare runs, by name: one registry, `METHODS` (docs/architecture.md, "Add a
baseline").

A method is a function of the seed's `SeedRun` returning its metrics and its compute in SFT-epoch
equivalents, the split its choice reads, and the methods it needs first (their results are in
`SeedRun.results` when it runs; they are run even when not asked for, and not reported then).
Methods run in registry order; the registry's order is also the report's.

Every final mixture is trained by `SeedRun.train_on`: same initialisation, same training seed
(unless a method asks for a fresh one), the same total number of examples as D0, the same number of
optimizer steps and schedule. What is shared between methods (the IDEAL loop, the uniform run, the
k Dirichlet runs) is computed once per seed, by the first method that asks for it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ideal_jax import artifacts, ideal, summary
from ideal_jax import round as round_lib
from ideal_jax.compare import baselines
from ideal_jax.configlib.loading import derived
from ideal_jax.data import mixture as mixture_lib
from ideal_jax.utils import progress
from ideal_jax.utils.distributed import is_lead_host

# The paper's IDEAL (METHOD.md §1.2) as the ablation "ideal_paper": fixed m, every step kept.
PAPER_STEP_SIZE = 0.15
PAPER_ROUNDS = 2

# Training seeds of the runs a method reports after a selection (random's retrain) are shifted
# by this much: no selection run of any seed uses them.
FRESH_TRAIN_SEED_OFFSET = 10_007


@dataclasses.dataclass
class SeedRun:
    """One seed of mode=compare: the loaded run every method shares, and what they produced."""

    cfg: Any
    sdir: str  # W/seed_S
    run: round_lib.Run
    results: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # (proportions, dev reference loss) of every mixture trained so far: RegMix's data.
    weights_seen: list[tuple[np.ndarray, float]] = dataclasses.field(default_factory=list)
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)  # computed once per seed

    @property
    def names(self) -> list[str]:
        return list(self.run.d0_ids)

    @property
    def epochs(self) -> int:
        return max(int(self.cfg.train.epochs), 1)

    @property
    def epoch_s(self) -> float:
        """Seconds of one SFT epoch (D0's training; NaN before it ran): compute's unit."""
        return self.shared.get("epoch_s", float("nan"))

    def once(self, key: str, compute: Callable[[], Any]) -> Any:
        """compute() the first time `key` is asked for in this seed, its result after."""
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]

    def train_on(self, name: str, weights, train_seed_offset: int = 0) -> tuple[dict, Any]:
        """Train and evaluate the mixture with proportions `weights` in SDIR/name;
        (metrics, trained parameters)."""
        cfg, run = self.cfg, self.run
        rdir = os.path.join(self.sdir, name)
        os.makedirs(rdir, exist_ok=True)
        total = sum(len(v) for v in run.d0_ids.values())
        mix = baselines.mixture_from_weights(
            run.d0_ids, weights, total, cfg.seed, pools=run.pools, upsample=cfg.data.upsample
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
            method_run = ideal.rebind(run, derived(cfg, {"train.seed": seed}))
        timer = artifacts.Timer(os.path.join(rdir, "timings.json"))
        with progress.stage(name):
            params, scores = round_lib.train_and_evaluate(
                method_run, rdir, timer, run.base_params, mix
            )
        return run_metrics(method_run.cfg, rdir, scores, mix), params

    def loop_compute(self, loop: dict[str, Any]) -> float:
        """An IDEAL loop's compute: every round it trained, plus its influence time."""
        influence_s = sum(float(r.get("timings", {}).get("influence", 0.0)) for r in loop["rounds"])
        return len(loop["rounds"]) * self.epochs + influence_s / self.epoch_s


@dataclasses.dataclass(frozen=True)
class Method:
    """run(seed_run) -> (metrics, compute in SFT epochs); chosen_on: the split its choice reads
    (none | dev | train); needs: the methods that must have run first."""

    run: Callable[[SeedRun], tuple[dict[str, Any], float]]
    chosen_on: str
    needs: tuple[str, ...] = ()


def run_metrics(cfg, rdir: str, scores: dict, mix) -> dict[str, Any]:
    """A trained run's metrics: test scores, dev reference loss, volumes, training figures."""
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
    return run_metrics(cfg, rdir, loop["rounds"][k]["eval"], mix)


def _train_seconds(rdir: str) -> float:
    path = os.path.join(rdir, "timings.json")
    return float(artifacts.read_json(path).get("train", 0.0)) if os.path.exists(path) else 0.0


def _proportions(volumes: dict[str, int], names: list[str]) -> np.ndarray:
    v = np.array([volumes[n] for n in names], dtype=np.float64)
    return v / v.sum()


def _ideal_loop(s: SeedRun) -> dict[str, Any]:
    """The IDEAL loop in SDIR/ideal (its summary); D0 is its round 0."""
    return s.once(
        "ideal", lambda: ideal.run_ideal(s.cfg, os.path.join(s.sdir, "ideal"), loaded=s.run)
    )


def d0(s: SeedRun):
    """D0, the pairing base: the IDEAL loop's round 0 (its training time is compute's unit)."""
    loop = _ideal_loop(s)
    metrics = _round_metrics(s.cfg, os.path.join(s.sdir, "ideal"), loop, 0)
    train_s = _train_seconds(os.path.join(s.sdir, "ideal", "round_0"))
    s.shared["epoch_s"] = train_s / s.epochs or float("nan")
    s.weights_seen.append((_proportions(metrics["volumes"], s.names), metrics["reference_loss"]))
    return metrics, s.epochs


def ideal_method(s: SeedRun):
    """The loop's result: the step policy's best accepted round (the last with policy = fixed);
    every round it trained counts in its compute, rejected or not."""
    loop = _ideal_loop(s)
    best = int(loop["result_round"])
    metrics = _round_metrics(s.cfg, os.path.join(s.sdir, "ideal"), loop, best)
    metrics["rounds_trained"] = len(loop["rounds"])
    metrics["result_round"] = best
    return metrics, s.loop_compute(loop)


def ideal_paper(s: SeedRun):
    """The paper's fixed step as an ablation: m = 0.15, 2 rounds, every step kept."""
    paper_cfg = derived(
        s.cfg,
        {"reweight.policy": "fixed", "reweight.step_size": PAPER_STEP_SIZE, "rounds": PAPER_ROUNDS},
    )
    paper_dir = os.path.join(s.sdir, "ideal_paper")
    with progress.stage("ideal_paper"):
        paper = ideal.run_ideal(paper_cfg, paper_dir, loaded=ideal.rebind(s.run, paper_cfg))
    metrics = _round_metrics(paper_cfg, paper_dir, paper, int(paper["result_round"]))
    return metrics, s.loop_compute(paper)


def uniform(s: SeedRun):
    """The same number of examples from every domain (DoReMi's reference model too)."""
    weights = baselines.uniform_weights(len(s.names))
    metrics, s.shared["uniform_params"] = s.train_on("uniform", weights)
    s.weights_seen.append((weights, metrics["reference_loss"]))
    return metrics, s.epochs


def _random_selection(s: SeedRun) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    """k Dirichlet mixtures trained in SDIR/random_I (once per seed): (draws, their metrics, the
    one with the lowest dev reference loss)."""

    def compute():
        cfg, k = s.cfg, int(s.cfg.compare.k)
        draws = baselines.dirichlet_weights(
            k, len(s.names), cfg.seed, cfg.compare.dirichlet_concentration
        )
        runs = [s.train_on(f"random_{i}", w)[0] for i, w in enumerate(draws)]
        s.weights_seen.extend((w, r["reference_loss"]) for w, r in zip(draws, runs))
        best = int(np.argmin([r["reference_loss"] for r in runs]))
        return draws, runs, best

    return s.once("random_selection", compute)


def random_best(s: SeedRun):
    """The best of k Dirichlet mixtures on the dev reference loss, retrained with a fresh
    training seed (the selection run's own score is biased upwards); its compute counts the k
    selection runs."""
    draws, runs, best = _random_selection(s)
    metrics, _ = s.train_on("random", draws[best], train_seed_offset=FRESH_TRAIN_SEED_OFFSET)
    metrics.update(
        chosen=best,
        selection_reference_losses=[r["reference_loss"] for r in runs],
        selection_train_seed=int(s.cfg.train.seed),
    )
    return metrics, (len(draws) + 1) * s.epochs


def regmix(s: SeedRun):
    """RegMix: a regression from every mixture trained so far (D0, uniform, the k random ones)
    to its dev reference loss, and its proposal."""
    cfg = s.cfg
    k = len(_random_selection(s)[0])
    fit = baselines.fit_regmix(
        np.stack([w for w, _ in s.weights_seen]), np.array([y for _, y in s.weights_seen])
    )
    proposal = baselines.propose_regmix(
        fit,
        len(s.names),
        cfg.seed,
        cfg.compare.dirichlet_concentration,
        int(cfg.compare.regmix_candidates),
        int(cfg.compare.regmix_top),
    )
    metrics, _ = s.train_on("regmix", proposal)
    predicted = float(baselines.predict_regmix(fit, proposal[None])[0])
    metrics["regression"] = dict(fit, predicted_reference_loss=predicted)
    return metrics, k * s.epochs + s.epochs


def doremi(s: SeedRun):
    """DoReMi's weights from a Group DRO proxy against the uniform run, trained like the others."""
    from ideal_jax.compare import doremi as doremi_lib

    run = s.run
    proxy_dir = os.path.join(s.sdir, "doremi", "proxy")
    uniform_mix = mixture_lib.read_manifest(os.path.join(s.sdir, "uniform", "mixture.json"))
    timer = artifacts.Timer(os.path.join(s.sdir, "doremi", "proxy_timings.json"))
    with progress.stage("doremi"):
        found = timer.run(
            "doremi_proxy",
            doremi_lib.doremi_weights,
            s.cfg,
            run.model_cfg,
            run.mesh,
            run.suite,
            uniform_mix,
            run.base_params,
            s.shared["uniform_params"],
            proxy_dir,
        )
    weights = np.array([found["weights"][n] for n in s.names])
    metrics, _ = s.train_on("doremi", weights)
    metrics["doremi_weights"] = found["weights"]
    proxy_s = float(timer.times.get("doremi_proxy", 0.0))
    return metrics, 2 * s.epochs + proxy_s / s.epoch_s


# Every method mode=compare knows, in the order they run and are reported; compare.methods names
# a subset (d0, the pairing base, always runs).
METHODS: dict[str, Method] = {
    "ideal": Method(ideal_method, chosen_on="dev", needs=("d0",)),
    "d0": Method(d0, chosen_on="none"),
    "uniform": Method(uniform, chosen_on="none", needs=("d0",)),
    "random": Method(random_best, chosen_on="dev", needs=("d0",)),
    "regmix": Method(regmix, chosen_on="dev", needs=("d0",)),
    "doremi": Method(doremi, chosen_on="train", needs=("d0", "uniform")),
    "ideal_paper": Method(ideal_paper, chosen_on="dev", needs=("d0",)),
}


def run_methods(s: SeedRun, methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Every method of `methods` and what they need, in registry order (a method's needs run
    before it); {method: metrics with compute_sft_epochs and chosen_on} for `methods` only."""
    wanted: set[str] = set()

    def want(name: str) -> None:
        if name not in wanted:
            wanted.add(name)
            for need in METHODS[name].needs:
                want(need)

    for name in methods:
        want(name)
    done: set[str] = set()

    def run(name: str) -> None:
        if name in done:
            return
        for need in METHODS[name].needs:
            run(need)
        done.add(name)
        metrics, compute = METHODS[name].run(s)
        s.results[name] = dict(
            metrics, compute_sft_epochs=float(compute), chosen_on=METHODS[name].chosen_on
        )

    for name in METHODS:
        if name in wanted:
            run(name)
    return {name: s.results[name] for name in METHODS if name in methods}
