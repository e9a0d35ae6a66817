"""IDEAL's outer loop (METHOD.md §1.2) and the small jobs built from the same round:

    D_0 = the given mixture (β = 0)
    for k = 0 .. rounds:                                   # a round: ideal_jax/round.py
        θ_k  = SFT(base model, D_k)                        # from the base model (or warm start)
        score θ_k on the evaluation tasks and reference losses
        if k == rounds: break
        α_k  = −∇L(D_ref, θ_k)ᵀ H⁻¹ ∇L(D_j, θ_k)           # Lemma 1, H ≈ K-FAC / EK-FAC
        β_k  = the reweight rule's step from α_k           # ideal_jax/reweight.py
        D_k+1 = (1 + β_k)·D_k: entries of D_k dropped or duplicated (nested resampling)
    final_mixture.jsonl = D_rounds

The loop carries a `RoundState` from round to round. Resume wraps it: a round whose row
(round_K/row.json) and successor state (round_K+1/state.json) exist is not run again; a round
that stopped half-way resumes at the stage it stopped in (each stage's artifact is cached).
mode=sft, mode=influence and mode=eval are one round each (`run_sft`, `run_influence`,
`run_eval_only`); several seeds are `run_seeds`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ideal_jax import artifacts, provenance, reweight, sharding, step_policy, summary
from ideal_jax.configlib.loading import derived
from ideal_jax.curvature import trained
from ideal_jax.data import mixture as mixture_lib
from ideal_jax.data import suite as suite_lib
from ideal_jax.model import loading
from ideal_jax.round import RoundState, Run, evaluate, initial_state, run_round, save_state
from ideal_jax.utils import distributed


def load_run(cfg, workdir: str, *, loaded: Run | None = None) -> Run:
    """Data, model and mesh for a run in `workdir` (or those of `loaded`, moved to `workdir`)."""
    if loaded is not None:
        return dataclasses.replace(loaded, workdir=workdir)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, workdir)
    model_cfg, base_params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    if cfg.daar.use_for_ideal:  # unlabeled pool: DaaR's pseudo-domains become IDEAL's domains
        from ideal_jax.daar import job as daar_job

        domains = daar_job.pseudo_domain_examples(cfg, workdir, suite, model_cfg, base_params, mesh)
        suite = suite_lib.with_domains(suite, domains, cfg.data)
    d0_ids, pools = suite_lib.d0_source_ids(cfg, suite)
    return Run(
        workdir=workdir,
        mesh=mesh,
        suite=suite,
        model_cfg=model_cfg,
        base_params=base_params,
        inputs={"data": provenance.data_fingerprint(suite)},
        steps_per_epoch=suite_lib.d0_steps_per_epoch(cfg, suite, d0_ids),
        pools=pools,
        d0_ids=d0_ids,
        **_config_parts(cfg),
    )


def _config_parts(cfg) -> dict[str, Any]:
    """The parts of a Run built from the config alone (the typed reweight and policy sections)."""
    return {
        "cfg": trained.with_trained_curvature_layers(cfg),  # freeze: influence over them
        "reweight_cfg": reweight.ReweightConfig.from_config_dict(cfg.reweight),
        "policy_cfg": step_policy.PolicyConfig.from_config_dict(cfg.reweight),
    }


def rebind(run: Run, cfg) -> Run:
    """`run` under another config with the same data, model and training budget (the compare
    ablation's reweight settings, another training seed): its config-built parts rebuilt."""
    return dataclasses.replace(run, **_config_parts(cfg))


def run_ideal(cfg, workdir: str, *, loaded: Run | None = None) -> dict[str, Any]:
    """The full loop for one seed; returns the summary (also written to WORKDIR/summary.json).

    loaded: a Run already loaded by the caller (mode=compare shares one across its methods).
    """
    run = load_run(cfg, workdir, loaded=loaded)
    _write_data_stats(workdir, run)
    state, rows = initial_state(run), []
    while True:
        last = state.k == cfg.rounds
        after, row = _resumable_round(run, state, step=not last)
        rows.append(row)
        if last or after is None:  # the round budget is spent, or the step policy stopped
            break
        state = after
    return _finish(run, rows)


def run_sft(cfg, workdir: str) -> dict[str, Any]:
    """mode=sft: train and evaluate D_0 (round_0 only)."""
    run = load_run(cfg, workdir)
    _write_data_stats(workdir, run)
    _, row = _resumable_round(run, initial_state(run), step=False)
    return _finish(run, [row])


def run_influence(cfg, workdir: str) -> dict[str, Any]:
    """mode=influence: α (and the step it implies) for cfg.model as it is, on D_0; no training."""
    run = load_run(cfg, workdir)
    _write_data_stats(workdir, run)
    _, row = run_round(run, initial_state(run), train=False, step=True)
    return _finish(run, [row])


def run_eval_only(cfg, workdir: str) -> dict[str, Any]:
    """mode=eval: score cfg.model on cfg.eval's tasks (and reference losses) → WORKDIR/eval.json."""
    run = load_run(cfg, workdir)
    timer = artifacts.Timer(os.path.join(workdir, "timings.json"))
    return evaluate(run, workdir, timer, run.base_params, run.stage_inputs("eval_base"))


def _resumable_round(run: Run, state: RoundState, *, step: bool) -> tuple[RoundState | None, dict]:
    """run_round, or its recorded outcome when round K already finished with these inputs.

    With step: (round K+1's state, row), or (None, row) when the step policy stopped the loop.
    """
    k = state.k
    row_path = os.path.join(run.rdir(k), "row.json")
    next_path = os.path.join(run.rdir(k + 1), "state.json")
    mix_path = os.path.join(run.rdir(k), "mixture.json")

    def row_inputs(stepped: bool) -> dict[str, str]:  # after the mixture exists
        return run.stage_inputs("reweight" if stepped else "eval", mixture=mix_path)

    if os.path.exists(row_path):
        saved = artifacts.read_json(row_path)
        provenance.check(row_path, row_inputs(bool(saved.get("step"))))
        stopped = bool(saved.get("stopped"))
        if saved["step"] == step and (not step or stopped or os.path.exists(next_path)):
            if not step:
                return state, saved["row"]
            if stopped:
                return None, saved["row"]
            return RoundState.from_json(artifacts.read_json(next_path), run, next_path), saved[
                "row"
            ]
    save_state(run, state)
    after, row = run_round(run, state, step=step)
    stopped = step and after is None
    if step and not stopped:
        save_state(run, after)
    record = {"step": step, "row": row}
    if stopped:
        record["stopped"] = True
    artifacts.write_json(row_path, record)
    provenance.record(row_path, row_inputs(step))
    return (after if step else state), row


def result_round(rows: list[dict]) -> int:
    """The round whose mixture is the run's result: the step policy's incumbent after the last
    round (the best accepted mixture), or the last round for runs without a policy record."""
    return int(rows[-1].get("policy", {}).get("incumbent", rows[-1]["round"]))


def _finish(run: Run, rows: list[dict]) -> dict[str, Any]:
    best = result_round(rows)
    if distributed.is_lead_host():  # the result first: a failing plot must not lose it
        last = os.path.join(run.rdir(best), "mixture.json")
        final = mixture_lib.read_manifest(last)
        mixture_lib.export_jsonl(
            final, run.suite.domains, os.path.join(run.workdir, "final_mixture.jsonl")
        )
    return summary.write_summary(
        run.workdir,
        run.cfg,
        rows,
        result_round=best,
        reweight_cfg=run.reweight_cfg,
        policy_cfg=run.policy_cfg,
    )


def seed_config(cfg, s: int, mode: str | None = None):
    """Repetition s of a multi-seed job: seed and training seed shifted by s, one seed, locked."""
    changes = {"seed": cfg.seed + s, "seeds": 1, "train.seed": cfg.train.seed + s}
    return derived(cfg, changes | ({} if mode is None else {"mode": mode}))


def run_seeds(cfg, workdir: str, run_one) -> dict[str, Any]:
    """cfg.seeds repetitions of the loop (seed and training seed cfg.seed + s, in WORKDIR/seed_S),
    aggregated with paired differences to each seed's D0 → WORKDIR/summary_seeds.json
    (WORKDIR/config.json is the caller's: ideal_jax/main.py prepares every workdir)."""
    results = []
    for s in range(cfg.seeds):
        results.append(run_one(seed_config(cfg, s), os.path.join(workdir, f"seed_{cfg.seed + s}")))
    agg = summary.aggregate_seeds(results)
    artifacts.write_json(os.path.join(workdir, "summary_seeds.json"), agg)
    print(summary.format_table(agg["scores"]))
    return agg


def _write_data_stats(workdir: str, run: Run) -> None:
    """DIR/data_stats.json: per domain (and the reference set) examples read, kept, truncated and
    dropped with the reason, and how many of the kept ones D0 holds (its share; the rest is the
    pool a growing domain draws from); rewritten only when it changes (a resumed run writes
    nothing). Per round, mixture.json says how many examples are fresh, repeated and unused."""
    suite, d0_ids = run.suite, run.d0_ids
    stats = {"domains": {}, "reference": suite.format_stats.get("reference")}
    for name, s in suite.format_stats.items():
        if name != "reference":
            stats["domains"][name] = {
                "read": s["n_examples"],
                "kept": s["n_kept"],
                "truncated": s["n_truncated"],
                "dropped": {
                    "response_truncated_away": s["n_dropped_no_response"],
                    "too_long": s["n_dropped_too_long"],
                },
                "prompt_tokens_cut": s["n_prompt_tokens_cut"],
                "response_tokens_cut": s["n_response_tokens_cut"],
            }
            if name in d0_ids:
                stats["domains"][name]["in_d0"] = len(d0_ids[name])
                stats["domains"][name]["pool_unused_by_d0"] = s["n_kept"] - len(d0_ids[name])
    path = os.path.join(workdir, "data_stats.json")
    if os.path.exists(path) and artifacts.read_json(path) == json.loads(json.dumps(stats)):
        return
    artifacts.write_json(path, stats)
