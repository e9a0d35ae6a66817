"""IDEAL's outer loop (METHOD.md §1.2), one round after another:

    D_0 = the given mixture (β = 0)
    for k = 0 .. rounds:
        θ_k  = SFT(base model, D_k)                        # from the base model (or warm start)
        score θ_k on the evaluation tasks and reference losses
        if k == rounds: break
        α_k  = −∇L(D_ref, θ_k)ᵀ H⁻¹ ∇L(D_j, θ_k)           # Lemma 1, H ≈ K-FAC / EK-FAC
        d_k  = −(α_k − Σ_j p_j α_kj)  (keep-total; else −α_k)  # ideal_jax/reweight.py
        β_k  = m · d_k / max_j |d_kj|                       # largest realised |β| = m
        D_k+1 = (1 + β_k)·D_k: entries of D_k dropped or duplicated (nested resampling)
    final_mixture.jsonl = D_rounds

Every stage writes its artifact under WORKDIR/round_K/ and is skipped when that artifact exists,
so a rerun of the same command resumes after a crash at any stage.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ideal_jax import configlib, provenance, reweight, sharding, stages, summary
from ideal_jax.data import mixture as mixture_lib
from ideal_jax.utils import distributed
from ideal_jax.utils.errors import InputError


def run_ideal(
    cfg,
    workdir: str,
    *,
    rounds: int | None = None,
    train: bool = True,
    influence_last: bool = False,
    loaded: tuple | None = None,
) -> dict[str, Any]:
    """The full loop for one seed; returns the summary (also written to WORKDIR/summary.json).

    rounds overrides cfg.rounds (0: train and evaluate D_0 only, mode=sft); train=False uses the
    model as loaded (mode=influence); influence_last computes α in the last round too.
    loaded: (mesh, suite, model_cfg, base_params) already loaded by the caller (mode=compare
    shares them across its methods).
    """
    rounds = cfg.rounds if rounds is None else rounds
    if loaded is None:
        mesh = sharding.make_mesh(dict(cfg.mesh))
        suite = stages.load_suite(cfg, workdir)
        model_cfg, base_params = stages.load_model(cfg, mesh, suite.tokenizer)
    else:
        mesh, suite, model_cfg, base_params = loaded
    if cfg.daar.use_for_ideal:  # unlabeled pool: DaaR's pseudo-domains become IDEAL's domains
        from ideal_jax.daar import job as daar_job

        domains = daar_job.pseudo_domain_examples(cfg, workdir, suite, model_cfg, base_params, mesh)
        suite = stages.with_domains(suite, domains, cfg.data)
    _write_data_stats(workdir, suite)
    reweight_cfg = reweight.ReweightConfig.from_config_dict(cfg.reweight)
    source_ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
    mix = mixture_lib.build_mixture(
        source_ids, None, seed=cfg.seed, keep_total=reweight_cfg.keep_total
    )  # D_0
    params, rows, predicted = base_params, [], None
    # What every artifact depends on; each is reused only if produced from the same (provenance.py).
    inputs = provenance.run_inputs(cfg, suite)
    for k in range(rounds + 1):
        rdir = os.path.join(workdir, f"round_{k}")
        os.makedirs(rdir, exist_ok=True)
        timer = stages.Timer(os.path.join(rdir, "timings.json"))
        previous_step = os.path.join(workdir, f"round_{k - 1}", "reweight.json")
        mix_path = os.path.join(rdir, "mixture.json")
        mix = stages.fix_mixture(
            mix_path, mix, provenance.with_upstream(inputs, step=previous_step) if k else inputs
        )
        round_inputs = provenance.with_upstream(inputs, mixture=mix_path)
        init = params if (cfg.train.warm_start and k > 0) else base_params
        params, scores = train_and_evaluate(
            cfg, rdir, timer, model_cfg, init, suite, mix, mesh, round_inputs, train=train
        )
        row = {
            "round": k,
            "mixture": summary.mixture_row(mix),
            "eval": scores,
            "timings": dict(timer.times),
        }
        if predicted is not None:  # rule "outer": Q's prediction vs the retrained model
            row["reference_loss_predicted"] = predicted
            row["reference_loss_measured"] = reference_objective(scores, cfg)
        if k < rounds or influence_last:
            influence_path = os.path.join(rdir, "influence.json")
            reused = provenance.reuse(influence_path, round_inputs)
            # rule "outer": Q needs the stage's operator and gradients, not only α, so the stage
            # runs again when the step is still to be taken (the recorded α stays the one used).
            with_outer = reweight_cfg.rule == "outer" and not os.path.exists(
                os.path.join(rdir, "reweight.json")
            )
            influence, outer_problem = (stages.read_json(influence_path) if reused else None), None
            if with_outer or not reused:
                out = timer.run(
                    "influence",
                    stages.influence_round,
                    cfg,
                    model_cfg,
                    params,
                    suite,
                    mix,
                    mesh,
                    with_outer,
                    record=not reused,
                )
                computed, outer_problem = out if with_outer else (out, None)
                if not reused:
                    influence = computed
                    if distributed.is_lead_host():
                        stages.write_json(influence_path, influence)
                    provenance.record(influence_path, round_inputs)
            all_row = influence["rows"].index("all")
            alpha_j = np.asarray(influence["matrix"][all_row])
            stderr_j = np.asarray(influence["stderr"][all_row]) if "stderr" in influence else None
            if list(influence["domains"]) != list(mix.domain_names):
                raise InputError(
                    f"influence.json columns {influence['domains']} are not the mixture's "
                    f"domains {list(mix.domain_names)}",
                    path=os.path.join(rdir, "influence.json"),
                    field="domains",
                )
            # β is relative to this round's volumes (β = 0 is D_k, where α was measured); the
            # optax rule continues from the previous round's optimizer state.
            step = reweight_round(
                workdir,
                k,
                alpha_j,
                mix,
                reweight_cfg,
                outer_problem,
                stderr_j,
                inputs=provenance.with_upstream(round_inputs, influence=influence_path),
            )
            if step.objective:
                predicted = step.objective["predicted_reference_loss"]
                row["objective"] = {
                    key: step.objective[key] for key in ("q_before", "q_after", "steps")
                }
            if stderr_j is not None:
                row["alpha_stderr"] = dict(zip(mix.domain_names, stderr_j.tolist()))
            row.update(
                alpha=dict(zip(mix.domain_names, alpha_j.tolist())),
                beta=dict(zip(mix.domain_names, step.beta_applied.tolist())),
                beta_nominal=dict(zip(mix.domain_names, step.beta_nominal.tolist())),
                indistinguishable=[
                    d
                    for d, flag in zip(
                        mix.domain_names, step.indistinguishable(reweight_cfg.significance_z)
                    )
                    if flag
                ],
                timings=dict(timer.times),
            )
            if k == rounds:
                rows.append(row)
                break
            # D_k+1 = (1 + β)·D_k: nested resampling of D_k itself (β = 0 keeps D_k).
            mix = mixture_lib.resample_from(
                mix, step.volumes_after, seed=cfg.seed + k + 1, beta_nominal=step.beta_nominal
            )
        rows.append(row)
    result = summary.write_summary(workdir, cfg, rows)
    if distributed.is_lead_host():
        final = mixture_lib.read_manifest(os.path.join(workdir, f"round_{rounds}", "mixture.json"))
        mixture_lib.export_jsonl(final, suite.domains, os.path.join(workdir, "final_mixture.jsonl"))
    return result


def seed_config(cfg, s: int, mode: str | None = None):
    """Repetition s of a multi-seed job: seed and training seed shifted by s, one seed, locked."""
    out = type(cfg)(cfg.to_dict())  # an unlocked copy
    out.seed, out.seeds, out.train.seed = cfg.seed + s, 1, cfg.train.seed + s
    if mode is not None:
        out.mode = mode
    return out.lock()


def run_seeds(cfg, workdir: str, run_one) -> dict[str, Any]:
    """cfg.seeds repetitions of the loop (seed and training seed cfg.seed + s, in WORKDIR/seed_S),
    aggregated with paired differences to each seed's D0 → WORKDIR/summary_seeds.json."""
    configlib.prepare_workdir(cfg, workdir)
    results = []
    for s in range(cfg.seeds):
        results.append(run_one(seed_config(cfg, s), os.path.join(workdir, f"seed_{cfg.seed + s}")))
    agg = summary.aggregate_seeds(results)
    stages.write_json(os.path.join(workdir, "summary_seeds.json"), agg)
    print(summary.format_table(agg["scores"]))
    return agg


def train_and_evaluate(
    cfg, rdir, timer, model_cfg, init_params, suite, mix, mesh, inputs, *, train: bool = True
) -> tuple[Any, dict[str, Any]]:
    """SFT on `mix` from `init_params` into RDIR/train, then RDIR/eval.json; (params, scores).

    Training resumes from its own checkpoints (a finished run just restores its parameters), the
    evaluation is reused if its inputs match. `inputs` are the fingerprints of what the run
    depends on (the mixture included). train=False evaluates `init_params` as they are.
    """
    params = init_params
    if train:
        train_dir = os.path.join(rdir, "train")
        if not provenance.reuse(train_dir, inputs):
            os.makedirs(train_dir, exist_ok=True)
            provenance.record(train_dir, inputs)
        params = timer.run(
            "train",
            stages.train_round,
            cfg,
            model_cfg,
            mesh,
            rdir,
            suite,
            mix,
            init_params,
            record=not stages.train_done(rdir),
        )
    return params, _evaluate(rdir, timer, cfg, model_cfg, params, suite, mesh, inputs)


def reweight_round(
    workdir: str,
    k: int,
    alpha_j,
    mix: mixture_lib.Mixture,
    reweight_cfg,
    outer_problem=None,
    stderr_j=None,
    *,
    inputs=None,
) -> reweight.Step:
    """round_K/reweight.json: the step from D_k's volumes (computed once; a rerun reads it back).

    A stateful rule (optax) continues from the state saved in round_{K-1}/reweight.json, so a
    resumed run continues it exactly as an uninterrupted one would.
    """
    path = os.path.join(workdir, f"round_{k}", "reweight.json")
    if os.path.exists(path):
        if inputs is not None:
            provenance.check(path, inputs)
        return reweight.Step.from_json(stages.read_json(path), mix.domain_names, path=path)
    state = None
    previous = os.path.join(workdir, f"round_{k - 1}", "reweight.json")
    if k > 0 and os.path.exists(previous):
        state = stages.read_json(previous).get("optimizer_state")
    step = reweight.compute_step(
        alpha_j, mix.target_sizes, reweight_cfg, state, outer_problem, stderr_j
    )
    if distributed.is_lead_host():
        stages.write_json(path, step.to_json(mix.domain_names))
    if inputs is not None:
        provenance.record(path, inputs)
    return step


def _write_data_stats(workdir: str, suite) -> None:
    """DIR/data_stats.json: per domain (and the reference set) examples read, kept, truncated and
    dropped with the reason; rewritten only when it changes (a resumed run writes nothing)."""
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
    path = os.path.join(workdir, "data_stats.json")
    if os.path.exists(path) and stages.read_json(path) == json.loads(json.dumps(stats)):
        return
    if distributed.is_lead_host():
        stages.write_json(path, stats)


def reference_objective(scores: dict, cfg) -> float | None:
    """The measured reference loss in Q's weighting (capability mean, or the token-weighted all)."""
    losses = scores.get("reference_loss") or {}
    if cfg.influence.get("reference_weighting", "capability") == "token":
        return losses.get("all")
    caps = [v for key, v in losses.items() if key != "all"]
    return float(np.mean(caps)) if caps else None


def run_eval_only(cfg, workdir: str) -> dict[str, Any]:
    """mode=eval: score cfg.model on cfg.eval's tasks (and reference losses) → WORKDIR/eval.json."""
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = stages.load_suite(cfg, workdir)
    model_cfg, params = stages.load_model(cfg, mesh, suite.tokenizer)
    return _evaluate(
        workdir,
        stages.Timer(os.path.join(workdir, "timings.json")),
        cfg,
        model_cfg,
        params,
        suite,
        mesh,
        provenance.run_inputs(cfg, suite),
    )


def _evaluate(
    directory: str, timer, cfg, model_cfg, params, suite, mesh, inputs=None
) -> dict[str, Any]:
    """DIRECTORY/eval.json (computed once; a rerun reads it back if its inputs match)."""
    return stages.cached(
        os.path.join(directory, "eval.json"),
        timer,
        "eval",
        stages.evaluate_round,
        cfg,
        model_cfg,
        params,
        suite,
        mesh,
        inputs=inputs,
    )
