"""How far each round's step goes, and whether it is kept: the step policy (beyond the paper).

The paper fixes m (the largest |β| of a step) at 0.15 and keeps every step. α gives a direction
whose first-order magnitude does not predict retraining (docs/method_choices.md), so the default
policy measures the size instead — the ratio test of trust-region methods, with the retrained model
as the measurement:

  round 0 trains D_0; its dev objective J_0 makes D_0 the incumbent; the step from D_0 has m_0.
  round k > 0 trains D_k (the incumbent's mixture moved by m_k) and measures J_k:
    J_k < J_incumbent  accept: D_k becomes the incumbent, the next step widens,
                       m_k+1 = min(widen · m_k, step_max), from D_k with α measured at θ_k;
    otherwise          reject: D_k is dropped, the next step shrinks, m_k+1 = shrink · m_k, and is
                       taken again from the incumbent (its mixture, its α) — a shorter step in the
                       same direction.
  The loop stops when m_k+1 < step_min (the floor) or the round budget (cfg.rounds retrainings
  after D_0) is spent. The result is the incumbent: the best accepted mixture (D_0 if no step was
  ever accepted). Rejected rounds are trained and evaluated, so they count in the compute.

The dev objective J is the reference loss (the dev split; reference_weighting decides its
capability weighting) by default; accept_on = dev_score uses minus the average exact-match score
on the reference rows instead.

policy = fixed is the paper: every step accepted, m constant, the last round's mixture the result.

Pure functions over a small state; round.py applies them, summary.json records every decision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ideal_jax.configlib.checks import check_fields, section_fields
from ideal_jax.utils.errors import InputError

POLICIES = ("trust_region", "fixed")
OBJECTIVES = ("reference_loss", "dev_score")  # round.py dev_objective
# The policy's cfg.reweight fields: choices and ranges (m, its bounds and their factors).
CHOICES = {"reweight.policy": POLICIES, "reweight.accept_on": OBJECTIVES}
RANGES: dict[str, tuple[Any, str]] = {
    "reweight.step_size": (lambda v: v > 0, "> 0"),
    "reweight.step_min": (lambda v: v > 0, "> 0"),
    "reweight.step_max": (lambda v: v > 0, "> 0"),
    "reweight.widen": (lambda v: v >= 1, ">= 1"),
    "reweight.shrink": (lambda v: 0 < v < 1, "in (0, 1)"),
}


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The cfg.reweight fields of the step policy (defaults only in configs/common.py)."""

    policy: str
    step_size: float  # m_0 (fixed: m)
    step_max: float
    step_min: float  # the floor
    widen: float
    shrink: float
    accept_on: str

    @classmethod
    def from_config_dict(cls, section) -> PolicyConfig:
        values = section_fields(section, cls, "reweight")
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def __post_init__(self):  # the config's own checks: choices, ranges, the bounds' order
        check_fields({"reweight": dataclasses.asdict(self)}, CHOICES, RANGES)
        lo, m, hi = self.step_min, self.step_size, self.step_max
        if self.policy == "trust_region" and not lo <= m <= hi:
            raise InputError(
                f"the step bounds are out of order: need step_min ({lo}) <= step_size ({m}) "
                f"<= step_max ({hi})",
                field=f"reweight.{'step_max' if m > hi else 'step_min'}",
            )


@dataclasses.dataclass(frozen=True)
class PolicyState:
    """Carried from round to round (saved in round_K/state.json)."""

    step_size: float  # m of the step that produced this round's mixture (m_0 for D_0)
    incumbent: int | None = None  # the round whose mixture is the best accepted so far
    incumbent_objective: float | None = None
    # The step that produced this round's mixture: the round it started from and α's
    # first-order prediction of the dev objective's change (Σ_j α_j β_j, β as applied).
    step_from: int | None = None
    predicted_change: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any] | None, path: str | None = None) -> PolicyState | None:
        if obj is None:
            return None
        try:
            optional = lambda key, kind: None if obj.get(key) is None else kind(obj[key])
            return cls(
                step_size=float(obj["step_size"]),
                incumbent=optional("incumbent", int),
                incumbent_objective=optional("incumbent_objective", float),
                step_from=optional("step_from", int),
                predicted_change=optional("predicted_change", float),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"malformed step-policy state ({e!r})", path=path) from None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What round k's measurement decides."""

    round: int
    objective: float
    accepted: bool
    incumbent: int  # the round the next step starts from (k if accepted)
    incumbent_objective: float
    step_size: float  # m of the next step
    stop: bool  # no next step (the floor was reached)
    reason: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def next_state(self, predicted_change: float | None = None) -> PolicyState:
        """The state of the round the next step produces (from the incumbent)."""
        return PolicyState(
            self.step_size,
            self.incumbent,
            self.incumbent_objective,
            step_from=self.incumbent,
            predicted_change=predicted_change,
        )


def initial_state(cfg: PolicyConfig) -> PolicyState:
    return PolicyState(step_size=float(cfg.step_size))


def decide(cfg: PolicyConfig, state: PolicyState, k: int, objective: float) -> Decision:
    """Round k measured `objective` (lower is better) on the mixture the state's step produced."""
    m = float(state.step_size)
    if cfg.policy == "fixed":  # the objective is recorded, never needed
        return Decision(k, objective, True, k, objective, m, False, "fixed step (paper)")
    if objective is None or not math.isfinite(objective):
        raise InputError(
            f"round {k}'s dev objective is {objective!r}: the step policy needs a finite value "
            "(a reference set with response tokens, or eval scores for accept_on=dev_score)",
            field="reweight.accept_on",
        )
    if state.incumbent is None:  # D_0: the first measurement is the first incumbent
        return Decision(k, objective, True, k, objective, m, False, "D0 is the first incumbent")
    if objective < state.incumbent_objective:
        wider = min(m * cfg.widen, cfg.step_max)
        return Decision(
            k,
            objective,
            True,
            k,
            objective,
            wider,
            False,
            f"improved on round {state.incumbent} ({objective:.6g} < "
            f"{state.incumbent_objective:.6g}): accepted, step {m:.4g} -> {wider:.4g}",
        )
    shorter = m * cfg.shrink
    stop = shorter < cfg.step_min
    return Decision(
        k,
        objective,
        False,
        state.incumbent,
        state.incumbent_objective,
        shorter,
        stop,
        f"no improvement on round {state.incumbent} ({objective:.6g} >= "
        f"{state.incumbent_objective:.6g}): rejected, step {m:.4g} -> {shorter:.4g}"
        + (f" < floor {cfg.step_min:.4g}: stop" if stop else ", retried from the incumbent"),
    )
