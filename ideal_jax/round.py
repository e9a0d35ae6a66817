"""Where a round starts: `run_round(run, state)` takes round k's state and returns round k+1's
state and round k's summary row (METHOD.md §1.2):

    θ_k = SFT(init, D_k) → scores → α_k (influence stage) → β_k (reweight rule) → D_k+1

A `RoundState` is what goes into a round: its index, the mixture D_k, the parameters to warm-start
from (or the round whose checkpoint holds them), the reweight rule's optimizer state and, for the
outer rule, Q's prediction of this round's reference loss. It is saved as round_K/state.json
before the round runs. Each stage inside a round is one `artifacts.cached` call keyed by the
stage's own fingerprints (provenance.stage_inputs), so a crash mid-round resumes at the stage it
stopped in; the loop in ideal.py skips whole rounds whose row and successor state exist.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from ideal_jax import artifacts, provenance, reweight, step_policy
from ideal_jax.data import mixture as mixture_lib
from ideal_jax.data.suite import Suite
from ideal_jax.utils import distributed
from ideal_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class Run:
    """What every round of one run shares (loaded once)."""

    cfg: Any
    workdir: str
    mesh: Any
    suite: Suite
    model_cfg: Any
    base_params: Any
    inputs: dict  # run-level fingerprints (data); stage fingerprints add config sections
    reweight_cfg: reweight.ReweightConfig
    policy_cfg: step_policy.PolicyConfig
    # The optimizer steps per epoch every training of the run takes (train.budget = d0_steps:
    # D0's); None: each mixture its own epoch.
    steps_per_epoch: int | None
    pools: dict[str, list[str]]  # each domain's whole source (ids): what a growing domain draws
    d0_ids: dict[str, list[str]]  # D0: each domain's share of its pool (data.initial_sizes)

    def rdir(self, k: int) -> str:
        return os.path.join(self.workdir, f"round_{k}")

    def stage_inputs(self, stage: str, **upstream: str) -> dict[str, str]:
        """Fingerprints an artifact of `stage` depends on: data, the config sections the stage
        reads, and the content of the upstream artifacts named."""
        own = provenance.stage_inputs(self.cfg, stage, self.inputs["data"])
        return provenance.with_upstream(own, **upstream)


@dataclasses.dataclass(frozen=True)
class RoundState:
    """What goes into round k."""

    k: int
    mixture: mixture_lib.Mixture  # D_k
    params: Any = None  # round k-1's trained parameters (warm start), when in memory
    params_round: int | None = None  # else the round whose checkpoint holds them
    optimizer_state: dict | None = None  # the reweight rule's state after round k-1's step
    predicted_reference_loss: float | None = None  # the rule's prediction for θ_k (Q, if any)
    policy: step_policy.PolicyState | None = None  # the step policy's state (None: D_0's)

    def to_json(self, run: Run) -> dict:
        out = {
            "round": self.k,
            "mixture": os.path.join(f"round_{self.k}", "mixture.json"),
            "volumes": dict(zip(self.mixture.domain_names, map(int, self.mixture.target_sizes))),
            "params_round": self.params_round,  # its checkpoint: round_{params_round}/train
            "optimizer_state": self.optimizer_state,
            "predicted_reference_loss": self.predicted_reference_loss,
        }
        if self.policy is not None:
            out["policy"] = self.policy.to_json()
        return out

    @classmethod
    def from_json(cls, obj: dict, run: Run, path: str) -> RoundState:
        """The state saved in round_K/state.json (its mixture read from round_K/mixture.json)."""
        try:
            k = int(obj["round"])
            mix = mixture_lib.read_manifest(os.path.join(run.workdir, obj["mixture"]))
            params_round = obj.get("params_round")
            return cls(
                k=k,
                mixture=mix,
                params_round=None if params_round is None else int(params_round),
                optimizer_state=obj.get("optimizer_state"),
                predicted_reference_loss=obj.get("predicted_reference_loss"),
                policy=step_policy.PolicyState.from_json(obj.get("policy"), path),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise InputError(
                f"round state is malformed ({e!r}); delete it to recompute the round",
                path=path,
                field=str(e.args[0]) if isinstance(e, KeyError) else None,
            ) from None


def fix_mixture(run: Run, state: RoundState) -> mixture_lib.Mixture:
    """round_K/mixture.json: the state's mixture, written once (with its provenance: the config,
    the data and the step that produced it); a resumed round reads it back."""
    k = state.k
    previous_step = os.path.join(run.rdir(k - 1), "reweight.json")
    return artifacts.cached(
        os.path.join(run.rdir(k), "mixture.json"),
        lambda: state.mixture,
        inputs=run.stage_inputs("mixture", **({"step": previous_step} if k else {})),
        load=mixture_lib.read_manifest,
        save=_save_manifest,
    )


def save_state(run: Run, state: RoundState) -> None:
    """round_K/state.json and round_K/mixture.json: what round K starts from."""
    os.makedirs(run.rdir(state.k), exist_ok=True)
    fix_mixture(run, state)
    artifacts.write_json(os.path.join(run.rdir(state.k), "state.json"), state.to_json(run))


def initial_state(run: Run) -> RoundState:
    """Round 0: D_0 = the given mixture (β = 0): each domain's share of its source
    (data.initial_sizes; the whole source by default), no optimizer state."""
    with_pool = run.cfg.data.upsample == "fresh_first" or run.d0_ids != run.pools
    mix = mixture_lib.build_mixture(
        run.d0_ids,
        None,
        seed=run.cfg.seed,
        keep_total=run.reweight_cfg.keep_total,
        pools=run.pools if with_pool else None,
        upsample=run.cfg.data.upsample,
    )
    return RoundState(k=0, mixture=mix)


def run_round(
    run: Run, state: RoundState, *, train: bool = True, step: bool = True
) -> tuple[RoundState | None, dict]:
    """Round k: train on D_k (train=False: evaluate the base model as it is), evaluate, and —
    with step — measure α and take the reweight step; (round k+1's state or None, row)."""
    cfg, k, rdir = run.cfg, state.k, run.rdir(state.k)
    os.makedirs(rdir, exist_ok=True)
    timer = artifacts.Timer(os.path.join(rdir, "timings.json"))
    mix = fix_mixture(run, state)
    init = run.base_params
    if cfg.train.warm_start and k > 0:
        init = state.params if state.params is not None else _restore(run, state.params_round)
    params, scores = train_and_evaluate(run, rdir, timer, init, mix, train=train)
    row = {"round": k, "mixture": _mixture_row(mix), "eval": scores}
    row["timings"] = dict(timer.times)
    if state.predicted_reference_loss is not None:  # the rule's prediction (Q) vs retrained
        row["reference_loss_predicted"] = state.predicted_reference_loss
        row["reference_loss_measured"] = reference_objective(scores, cfg)
    # The step policy's measurement: keep D_k (accept) or return to the incumbent (reject).
    policy_state = state.policy or step_policy.initial_state(run.policy_cfg)
    objective = dev_objective(scores, cfg, run.policy_cfg.accept_on)
    decision = step_policy.decide(run.policy_cfg, policy_state, k, objective)
    row["policy"] = decision.to_json()
    if policy_state.predicted_change is not None and decision.objective is not None:
        row["predicted_change"] = policy_state.predicted_change
        row["measured_change"] = decision.objective - policy_state.incumbent_objective
        row["step_from"] = policy_state.step_from
    if not step or decision.stop:
        return None, row
    # The step starts from the incumbent: this round if accepted, else the best accepted one
    # (its mixture, α, optimizer state), with the policy's new step size.
    base = k if decision.accepted else decision.incumbent
    base_dir = run.rdir(base)
    base_mix_path = os.path.join(base_dir, "mixture.json")
    base_mix = mix if base == k else mixture_lib.read_manifest(base_mix_path)
    base_opt_state = state.optimizer_state
    if base != k:
        saved = artifacts.read_json(os.path.join(base_dir, "state.json"))
        base_opt_state = saved.get("optimizer_state")
    influence_path = os.path.join(base_dir, "influence.json")
    influence_inputs = run.stage_inputs("influence", mixture=base_mix_path)
    reweight_path = os.path.join(rdir, "reweight.json")
    influence = None
    if provenance.reuse(influence_path, influence_inputs):
        influence = _read_influence(influence_path)
    # A rule that needs the outer problem (Q: the stage's operator and gradients, not only α)
    # has the stage run again when the step is still to be taken (the recorded α stays the one
    # used).
    with_outer = run.reweight_cfg.rule_needs == "outer" and not os.path.exists(reweight_path)
    outer_problem = None
    if influence is None or with_outer:
        base_params = params if base == k else _restore(run, base)
        computed = timer.run(
            "influence",
            _influence_stage,
            run,
            base_params,
            base_mix,
            with_outer,
            record=influence is None,
        )
        outer_problem = computed.outer_problem
        if influence is None:
            influence = artifacts.cached(
                influence_path,
                lambda: computed,
                inputs=influence_inputs,
                save=lambda path, result: artifacts.write_json(path, result.to_json()),
            )
    influence.check_domains(base_mix.domain_names, influence_path)
    alpha_j, stderr_j = influence.row("all"), influence.stderr_row("all")
    step_cfg = dataclasses.replace(run.reweight_cfg, step_size=decision.step_size)
    reweight_inputs = run.stage_inputs("reweight", mixture=base_mix_path, influence=influence_path)
    if run.policy_cfg.policy != "fixed":
        # the step's size and origin come from the policy state saved with this round
        reweight_inputs = provenance.with_upstream(
            reweight_inputs, state=os.path.join(rdir, "state.json")
        )
    # β is relative to the base round's volumes (β = 0 is that mixture, where α was measured);
    # stateful rules continue from the optimizer state that mixture was reached with.
    the_step = artifacts.cached(
        reweight_path,
        lambda: reweight.compute_step(
            alpha_j,
            base_mix.target_sizes,
            step_cfg,
            base_opt_state,
            outer_problem,
            stderr_j,
        ),
        inputs=reweight_inputs,
        load=lambda p: reweight.Step.from_json(
            artifacts.read_json(p), base_mix.domain_names, path=p
        ),
        save=lambda p, s: artifacts.write_json(p, s.to_json(base_mix.domain_names)),
    )
    predicted = None
    if the_step.objective:
        predicted = the_step.objective["predicted_reference_loss"]
        row["objective"] = {
            key: the_step.objective[key] for key in ("q_before", "q_after", "steps")
        }
    if stderr_j is not None:
        row["alpha_stderr"] = dict(zip(base_mix.domain_names, stderr_j.tolist()))
    names = base_mix.domain_names
    # α's first-order prediction of the dev objective's change for the step as applied.
    predicted_change = float(np.dot(alpha_j, the_step.beta_applied))
    row.update(
        alpha=dict(zip(names, alpha_j.tolist())),
        beta=dict(zip(names, the_step.beta_applied.tolist())),
        beta_nominal=dict(zip(names, the_step.beta_nominal.tolist())),
        indistinguishable=[
            d
            for d, flag in zip(names, the_step.indistinguishable(run.reweight_cfg.significance_z))
            if flag
        ],
        next_step={
            "from_round": base,
            "step_size": decision.step_size,
            "predicted_change": predicted_change,
        },
        timings=dict(timer.times),
    )
    # D_k+1 = (1 + β)·D_base: nested resampling of the base mixture itself (β = 0 keeps it).
    next_mix = mixture_lib.resample_from(
        base_mix,
        the_step.volumes_after,
        seed=cfg.seed + k + 1,
        beta_nominal=the_step.beta_nominal,
        pools=run.pools if base_mix.pool_sizes else None,
        upsample=cfg.data.upsample,
    )
    return RoundState(
        k=k + 1,
        mixture=next_mix,
        params=params if base == k else None,
        params_round=base,
        optimizer_state=the_step.optimizer_state,
        predicted_reference_loss=predicted,
        policy=decision.next_state(predicted_change),
    ), row


def dev_objective(scores: dict, cfg, accept_on: str) -> float | None:
    """The step policy's J of a round (lower is better): the dev reference loss, or minus the
    average exact match on the reference rows (the eval task "dev")."""
    if accept_on == "dev_score":
        per_cap = ((scores.get("tasks") or {}).get("dev") or {}).get("per_capability") or {}
        return -float(np.mean(list(per_cap.values()))) if per_cap else None
    return reference_objective(scores, cfg)


def train_and_evaluate(
    run: Run, rdir: str, timer, init_params, mix, *, train: bool = True
) -> tuple[Any, dict[str, Any]]:
    """SFT on `mix` from `init_params` into RDIR/train, then RDIR/eval.json; (params, scores).

    Training resumes from its own checkpoints (a finished run restores its parameters); the
    evaluation is reused if its inputs match. train=False evaluates `init_params` as they are.
    """
    from ideal_jax.train.stage import train_done, train_round

    cfg, mix_path = run.cfg, os.path.join(rdir, "mixture.json")
    params = init_params
    if train:
        train_dir = os.path.join(rdir, "train")
        train_inputs = run.stage_inputs("train", mixture=mix_path)
        if not provenance.reuse(train_dir, train_inputs):
            os.makedirs(train_dir, exist_ok=True)
            provenance.record(train_dir, train_inputs)
        params = timer.run(
            "train",
            train_round,
            cfg.train,
            cfg.data,
            run.model_cfg,
            run.mesh,
            rdir,
            run.suite,
            mix,
            init_params,
            show_progress=cfg.progress,
            steps_per_epoch=run.steps_per_epoch,
            record=not train_done(rdir),
        )
    eval_inputs = run.stage_inputs("eval" if train else "eval_base", mixture=mix_path)
    return params, evaluate(run, rdir, timer, params, eval_inputs)


def evaluate(run: Run, directory: str, timer, params, inputs) -> dict[str, Any]:
    """DIRECTORY/eval.json (computed once; a rerun reads it back if its inputs match)."""
    from ideal_jax.evaluate.stage import evaluate_round

    cfg = run.cfg
    return artifacts.cached(
        os.path.join(directory, "eval.json"),
        lambda: evaluate_round(
            cfg.eval,
            run.model_cfg,
            params,
            run.suite,
            run.mesh,
            seed=cfg.seed,
            loss_batch_size=cfg.influence.batch_size,
            seq_len=cfg.train.seq_len,
            show_progress=cfg.progress,
        ),
        inputs=inputs,
        timer=timer,
        name="eval",
    )


def reference_objective(scores: dict, cfg) -> float | None:
    """The measured reference loss in Q's weighting (capability mean, or the token-weighted all)."""
    losses = scores.get("reference_loss") or {}
    if cfg.influence.reference_weighting == "token":
        return losses.get("all")
    caps = [v for key, v in losses.items() if key != "all"]
    return float(np.mean(caps)) if caps else None


def _influence_stage(run: Run, params, mix, with_outer: bool):
    from ideal_jax.influence.stage import influence_from_config
    from ideal_jax.train.stage import prefix_cache_dir

    return influence_from_config(
        run.cfg,
        run.model_cfg,
        params,
        run.suite,
        mix,
        run.mesh,
        with_outer=with_outer,
        prefix_cache_dir=prefix_cache_dir(run.cfg.train, run.rdir(0)),
    )


def _read_influence(path: str, obj: dict | None = None):
    from ideal_jax.influence.result import RoundInfluence

    return RoundInfluence.from_json(artifacts.read_json(path) if obj is None else obj, path)


def _restore(run: Run, k: int | None):
    """Round k's trained parameters, from its finished training run's checkpoint."""
    from ideal_jax.train.stage import train_round

    if k is None:
        return run.base_params
    rdir = run.rdir(k)
    mix = mixture_lib.read_manifest(os.path.join(rdir, "mixture.json"))
    init = run.base_params  # only its structure matters: a finished run restores its own
    return train_round(
        run.cfg.train,
        run.cfg.data,
        run.model_cfg,
        run.mesh,
        rdir,
        run.suite,
        mix,
        init,
        show_progress=False,
        steps_per_epoch=run.steps_per_epoch,
    )


def _save_manifest(path: str, mix) -> None:
    if distributed.is_lead_host():
        mixture_lib.write_manifest(mix, path)


def _mixture_row(mix) -> dict:
    from ideal_jax import summary

    return summary.mixture_row(mix)
