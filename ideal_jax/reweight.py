"""β: the step from this round's volumes to the next round's, computed from α (METHOD.md §1.2).

Domain j enters the next round with (1 + β_j)·n_j examples, n_j its volume in the round's mixture
D_k (resampling from D_k itself lives in ideal_jax.data.mixture). Everything here is a pure
function of arrays: no I/O.

The direction d. α_j = ∂Q/∂β_j (Lemma 1), so moving against α lowers the reference loss.
  keep_total=False   d = −α                  (the paper's rule; the total volume may change)
  keep_total=True    d = −(α − Σ_j p_j α_j)  p_j = n_j / N, so Σ_j n_j d_j = 0: the total stays N
The keep-total direction is the constraint itself, not a rescale applied after the step: with
"paper" scaling α^exact_j = p_j (α_j − Σ_k p_k α_k), so d_j = −α^exact_j / p_j, a descent direction
of the exact objective; with "exact" scaling α already sums to zero (Q depends only on
proportions) and shifting β by a constant is first-order neutral, so the same formula applies.

The rules.
  "paper"  β = m · d / max_j |d_j|: the domain with the largest |d| moves by exactly ±m.
  "optax"  any optax optimizer fed the scale-free gradient g = −d / max|d| (max |g| = 1); its update
           is projected onto the constraint (keep_total) and bounded so that max |β| ≤ m. The
           optimizer state and the cumulative position carry over from round to round and are saved
           with the round (reweight.json), so a resumed run continues them.
  "outer"  several optax steps (outer_optimizer, outer_learning_rate, outer_steps) on the outer
           objective Q(w) over proportions (ideal_jax/influence/outer_objective.py) inside the trust
           region |β_j| ≤ m; the total is kept. Q before and after, every step's value and the
           predicted reference loss of the next round are recorded.

Bounds: β ∈ [beta_min, beta_max] and at least `min_volume` examples per domain; under keep_total the
clipped domains are held and the others shifted so that Σ n_j β_j = 0 still holds.

Realisation: integer volumes floor((1 + β_j) n_j) (keep_total: largest-remainder rounding to the
exact total N, so every volume is within one example of (1 + β_j) n_j). The β recorded as *applied*
is n'_j / n_j − 1, what the resampling actually did; the continuous β is recorded as *nominal*.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ideal_jax.configlib.checks import check_fields, section_fields
from ideal_jax.utils.errors import InputError

# What a rule may need from its round besides the direction from α.
NEEDS = ("alpha", "outer")
# floor((1 + β) n) must not lose an example to float error: (1 - 0.9) * 10 = 0.9999999999999998.
_FLOOR_EPS = 1e-9

# cfg.reweight's numeric fields and their ranges (the rule's names: RULES, at the end of the
# module; step_size and the step bounds: ideal_jax/step_policy.py, PolicyConfig).
RANGES: dict[str, tuple[Any, str]] = {
    "reweight.learning_rate": (lambda v: v > 0, "> 0"),
    "reweight.outer_learning_rate": (lambda v: v > 0, "> 0"),
    "reweight.outer_steps": (lambda v: v >= 1, ">= 1"),
    "reweight.significance_z": (lambda v: v >= 0, ">= 0"),
    "reweight.beta_min": (lambda v: -1 <= v <= 0, "in [-1, 0] (β = -1 empties a domain)"),
    "reweight.beta_max": (lambda v: v >= 0, ">= 0"),
    "reweight.min_volume": (lambda v: v >= 0 and v == int(v), "an integer >= 0"),
}


@dataclasses.dataclass(frozen=True)
class ReweightConfig:
    """cfg.reweight as a typed, validated value: `ReweightConfig.from_config_dict(cfg.reweight)`.

    Every field is a cfg.reweight field; their meanings and defaults live in configs/common.py
    only (no defaults here).
    """

    rule: str  # a name in RULES: "paper" | "optax" | "outer"
    step_size: float  # m
    beta_min: float
    beta_max: float
    min_volume: int
    optimizer: str  # rule="optax": an optax constructor name
    learning_rate: float  # rule="optax"
    keep_total: bool
    significance_z: float
    hold_indistinguishable: bool
    outer_optimizer: str  # rule="outer"
    outer_learning_rate: float
    outer_steps: int

    @classmethod
    def from_config_dict(cls, section, **overrides) -> ReweightConfig:
        """From cfg.reweight (an ml_collections section or a dict), `overrides` replacing fields;
        a field missing from the section is an InputError naming it."""
        values = section_fields(section, cls, "reweight", overrides=overrides)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def __post_init__(self):  # its own choices and ranges (InputError naming the field)
        check_fields(
            {"reweight": dataclasses.asdict(self)}, {"reweight.rule": tuple(RULES)}, RANGES
        )
        for field in ("optimizer", "outer_optimizer"):
            name = getattr(self, field)
            if not (isinstance(name, str) and callable(getattr(optax, name, None))):
                raise InputError(
                    f"{name!r} is not an optax optimizer; allowed: the name of one, "
                    "e.g. sgd, adam, adamw",
                    field=f"reweight.{field}",
                )

    @property
    def rule_needs(self) -> str:
        """What the rule needs from the round besides α: "alpha" (nothing) | "outer" (the
        round's outer problem: the influence stage's operator and gradients)."""
        return RULES[self.rule].needs


@dataclasses.dataclass(frozen=True)
class Step:
    """One round's reweighting: what the rule asked for and what the volumes became."""

    rule: str
    keep_total: bool
    alpha: np.ndarray  # the α row the step used
    direction: np.ndarray  # d (before normalisation)
    beta_nominal: np.ndarray  # continuous β after bounds
    volumes_before: np.ndarray  # n_j (int)
    volumes_after: np.ndarray  # n'_j (int)
    optimizer_state: dict | None = None  # rule="optax": {"leaves": [...], "position": [...]}
    objective: dict | None = None  # rule="outer": Q before/after, values per step, proportions
    stderr: np.ndarray | None = None  # standard error of each α (None when not measured)
    held: tuple[bool, ...] = ()  # domains kept at their volume (hold_indistinguishable)

    def indistinguishable(self, z: float) -> np.ndarray:
        """Domains whose |α| is below z standard errors (all False without standard errors)."""
        if self.stderr is None:
            return np.zeros(len(self.alpha), bool)
        return np.abs(self.alpha) < z * np.asarray(self.stderr)

    @property
    def beta_applied(self) -> np.ndarray:
        """n'_j / n_j − 1: the step the resampling realised."""
        before = np.maximum(self.volumes_before, 1).astype(np.float64)
        return self.volumes_after / before - 1.0

    def to_json(self, domains: Sequence[str]) -> dict[str, Any]:
        per = lambda x: {d: float(v) for d, v in zip(domains, x)}
        return {
            "rule": self.rule,
            "keep_total": self.keep_total,
            "alpha": per(self.alpha),
            "direction": per(self.direction),
            "beta_nominal": per(self.beta_nominal),
            "beta_applied": per(self.beta_applied),
            "volumes_before": {d: int(v) for d, v in zip(domains, self.volumes_before)},
            "volumes_after": {d: int(v) for d, v in zip(domains, self.volumes_after)},
            "optimizer_state": self.optimizer_state,
            "objective": self.objective,
            "alpha_stderr": None if self.stderr is None else per(self.stderr),
            "held": [d for d, h in zip(domains, self.held) if h],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], domains: Sequence[str], path: str | None = None):
        try:
            arr = lambda key, dtype=np.float64: np.asarray([obj[key][d] for d in domains], dtype)
            return cls(
                rule=obj["rule"],
                keep_total=bool(obj["keep_total"]),
                alpha=arr("alpha"),
                direction=arr("direction"),
                beta_nominal=arr("beta_nominal"),
                volumes_before=arr("volumes_before", np.int64),
                volumes_after=arr("volumes_after", np.int64),
                optimizer_state=obj.get("optimizer_state"),
                objective=obj.get("objective"),
                stderr=None if obj.get("alpha_stderr") is None else arr("alpha_stderr"),
                held=tuple(d in obj.get("held", ()) for d in domains),
            )
        except (KeyError, TypeError) as e:
            raise InputError(f"malformed reweight record ({e!r})", path=path) from None


@dataclasses.dataclass(frozen=True)
class RuleInput:
    """What a rule's step sees: the direction d (α projected, held domains zeroed), the volumes,
    the config, the optimizer state the base mixture was reached with, and the round's outer
    problem (None unless the rule needs it)."""

    d: np.ndarray
    sizes: np.ndarray
    cfg: ReweightConfig
    optimizer_state: dict | None
    outer: Any = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """A reweight rule: `step(RuleInput) -> (β, optimizer state to save, objective record)`.

    needs: "alpha" (α only) | "outer" (the round's outer problem: the influence stage runs
    again for its operator and gradients when the step is still to be taken). trust_region:
    β is bounded to |β| <= m with the total kept, whatever keep_total says.
    """

    step: Callable[[RuleInput], tuple[np.ndarray, dict | None, dict | None]]
    needs: str = "alpha"
    trust_region: bool = False

    def __post_init__(self):
        if self.needs not in NEEDS:
            raise ValueError(f"a rule needs one of {NEEDS}, not {self.needs!r}")


def direction(alpha_j: np.ndarray, sizes_j: Sequence[int], keep_total: bool) -> np.ndarray:
    """d = −α, or with keep_total −(α − Σ p_j α_j) so that Σ_j n_j d_j = 0 (module docstring)."""
    alpha_j = np.asarray(alpha_j, np.float64)
    if not np.all(np.isfinite(alpha_j)):
        raise InputError(f"α has non-finite entries: {alpha_j.tolist()}", field="alpha")
    if not keep_total:
        return -alpha_j
    sizes_j = np.asarray(sizes_j, np.float64)
    d_j = -(alpha_j - np.dot(sizes_j, alpha_j) / sizes_j.sum())
    # Equal α: the projection is zero up to rounding, and normalising rounding noise is no step.
    if np.max(np.abs(d_j)) <= 1e-12 * np.max(np.abs(alpha_j)):
        return np.zeros_like(d_j)
    return d_j


def max_normalized(d_j: np.ndarray, step_size: float) -> np.ndarray:
    """m · d / max_j |d_j| (zeros when d is zero): the largest entry moves by exactly m."""
    d_j = np.asarray(d_j, np.float64)
    scale = np.max(np.abs(d_j)) if d_j.size else 0.0
    if scale == 0.0:
        return np.zeros_like(d_j)
    return (step_size / scale) * d_j


def bound(
    beta_j: np.ndarray, sizes_j: Sequence[int], cfg: ReweightConfig, fixed: np.ndarray | None = None
) -> np.ndarray:
    """Clip β to [beta_min, beta_max] and ≥ min_volume examples, keeping Σ n β = 0 if keep_total
    (by shifting the domains that are neither clipped nor `fixed`)."""
    sizes_j = np.asarray(sizes_j, np.float64)
    lo = np.maximum(cfg.beta_min, cfg.min_volume / np.maximum(sizes_j, 1.0) - 1.0)
    hi = np.full_like(lo, cfg.beta_max)
    beta_j = np.clip(np.asarray(beta_j, np.float64), lo, hi)
    if not cfg.keep_total:
        return beta_j
    free = np.ones(beta_j.shape, bool) if fixed is None else ~np.asarray(fixed, bool)
    for _ in range(len(beta_j) + 1):  # each pass fixes at least one more domain at its bound
        excess = np.dot(sizes_j, beta_j)
        if abs(excess) <= 1e-12 * sizes_j.sum() or not free.any():
            break
        beta_j[free] -= excess / sizes_j[free].sum()
        clipped = np.clip(beta_j, lo, hi)
        free &= clipped == beta_j
        beta_j = clipped
    return beta_j


def realise(sizes_j: Sequence[int], beta_j: np.ndarray, keep_total: bool) -> np.ndarray:
    """Integer volumes for (1 + β) n: floor, or largest remainder to the exact total N."""
    sizes = np.asarray(sizes_j, np.float64)
    raw = (1.0 + np.asarray(beta_j, np.float64)) * sizes
    if np.any(raw < 0) or not np.all(np.isfinite(raw)):
        raise InputError(f"volumes must be finite and ≥ 0, got {raw.tolist()}", field="beta")
    if not keep_total:
        return np.asarray([math.floor(x + _FLOOR_EPS) for x in raw], np.int64)
    total = int(round(sizes.sum()))
    raw = raw * total / raw.sum() if raw.sum() > 0 else raw  # exact when Σ n β = 0 already
    floors = np.floor(raw + _FLOOR_EPS).astype(np.int64)
    missing = total - int(floors.sum())
    order = np.argsort(-(raw - floors), kind="stable")  # largest fractional parts first
    if missing >= 0:
        floors[order[:missing]] += 1
    else:
        floors[order[missing:]] -= 1
    return floors


def make_optimizer(cfg: ReweightConfig) -> optax.GradientTransformation:
    return getattr(optax, cfg.optimizer)(cfg.learning_rate)


def _optax_update(g_j: np.ndarray, cfg: ReweightConfig, saved: dict | None):
    """(update, saved state) of the optax rule; `saved` is the JSON form of the previous state."""
    optimizer = make_optimizer(cfg)
    n = len(g_j)
    position = jnp.zeros((n,), jnp.float32)
    state = optimizer.init(position)
    if saved is not None:
        treedef = jax.tree.structure(state)
        try:
            leaves = [
                jnp.asarray(x, leaf.dtype)
                for x, leaf in zip(saved["leaves"], jax.tree.leaves(state))
            ]
            position = jnp.asarray(saved["position"], jnp.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"saved optimizer state is malformed ({e!r})", field="optimizer_state"
            ) from None
        if len(leaves) != treedef.num_leaves:
            raise InputError(
                "saved optimizer state does not match reweight.optimizer", field="optimizer_state"
            )
        shapes = [tuple(x.shape) for x in leaves]
        expected = [tuple(leaf.shape) for leaf in jax.tree.leaves(state)]
        if shapes != expected or position.shape != (n,):
            raise InputError(
                f"saved optimizer state is for {position.shape[0] if position.ndim else 0} "
                f"domains, the mixture has {n}",
                field="optimizer_state",
            )
        state = jax.tree.unflatten(treedef, leaves)
    updates, state = optimizer.update(jnp.asarray(g_j, jnp.float32), state, position)
    update = np.asarray(updates, np.float64)
    new_saved = {
        "leaves": [np.asarray(x).tolist() for x in jax.tree.leaves(state)],
        "position": (np.asarray(position, np.float64) + update).tolist(),
    }
    return update, new_saved


def compute_step(
    alpha_j: np.ndarray,
    sizes_j: Sequence[int],
    cfg: ReweightConfig,
    optimizer_state: dict | None = None,
    outer_problem=None,
    stderr_j: np.ndarray | None = None,
) -> Step:
    """The next round's volumes from this round's α row and volumes n_j (module docstring).

    A rule whose `needs` is "outer" gets `outer_problem`
    (ideal_jax.influence.outer_objective.OuterProblem of the round); the others need α only.
    stderr_j: α's standard errors; with cfg.hold_indistinguishable, domains whose |α| is below
    cfg.significance_z of them keep their volume (their d_j is 0; the others carry the step).
    """
    sizes = np.asarray(sizes_j, np.int64)
    if sizes.shape != np.shape(alpha_j):
        raise InputError(f"{len(sizes)} volumes for {np.size(alpha_j)} α values", field="alpha")
    held = np.zeros(len(sizes), bool)
    if stderr_j is not None and cfg.hold_indistinguishable:
        held = np.abs(np.asarray(alpha_j)) < cfg.significance_z * np.asarray(stderr_j)
    d = direction(alpha_j, sizes, cfg.keep_total)
    if held.any():
        d = np.where(held, 0.0, d)
        free = ~held
        if cfg.keep_total and free.any():  # the free domains alone keep Σ n d = 0
            d[free] -= np.dot(sizes[free], d[free]) / sizes[free].sum()
    rule = RULES[cfg.rule]
    beta, saved, record = rule.step(
        RuleInput(d=d, sizes=sizes, cfg=cfg, optimizer_state=optimizer_state, outer=outer_problem)
    )
    beta = np.where(held, 0.0, beta)
    if rule.trust_region:  # no domain moves by more than m; the total is kept
        cfg = dataclasses.replace(
            cfg,
            beta_min=max(cfg.beta_min, -cfg.step_size),
            beta_max=min(cfg.beta_max, cfg.step_size),
            keep_total=True,
        )
    beta = bound(beta, sizes, cfg, fixed=held)
    return Step(
        rule=cfg.rule,
        keep_total=cfg.keep_total,
        alpha=np.asarray(alpha_j, np.float64),
        direction=d,
        beta_nominal=beta,
        volumes_before=sizes,
        volumes_after=realise(sizes, beta, cfg.keep_total),
        optimizer_state=saved,
        objective=record,
        stderr=None if stderr_j is None else np.asarray(stderr_j, np.float64),
        held=tuple(bool(h) for h in held),
    )


def _outer_step(inputs: RuleInput):
    """β from optax steps on Q(w); w are loss-weight (token) shares, β is per example."""
    from ideal_jax.influence import outer_objective

    problem, sizes, cfg = inputs.outer, inputs.sizes, inputs.cfg
    if problem is None:
        raise InputError("rule 'outer' needs the round's outer objective", field="reweight.rule")
    optimizer = getattr(optax, cfg.outer_optimizer)(cfg.outer_learning_rate)
    result = outer_objective.optimise(
        problem, trust_region=cfg.step_size, optimizer=optimizer, steps=cfg.outer_steps
    )
    p = np.asarray(problem.proportions, np.float64)
    # Examples per domain at token share w: n_j · w_j / p_j, scaled to keep the total N.
    volumes = sizes * result.proportions / p
    volumes *= sizes.sum() / volumes.sum()
    beta = volumes / sizes - 1.0
    record = {
        "q_before": float(result.values[0]),
        "q_after": float(np.min(result.values)),
        "predicted_reference_loss": float(np.min(result.values)),
        "values": result.values.tolist(),
        "steps": result.steps,
        "optimizer": cfg.outer_optimizer,
        "learning_rate": cfg.outer_learning_rate,
        "trust_region": cfg.step_size,
        "proportions_before": p.tolist(),
        "proportions_after": result.proportions.tolist(),
        "grad_at_start": result.grad_at_start.tolist(),
    }
    return beta, None, record


def _paper_step(inputs: RuleInput):
    """β = m · d / max |d| (module docstring)."""
    return max_normalized(inputs.d, inputs.cfg.step_size), None, None


def _optax_step(inputs: RuleInput):
    """An optax update on the scale-free gradient, projected (keep_total) and bounded by m."""
    d, sizes, cfg = inputs.d, inputs.sizes, inputs.cfg
    scale = np.max(np.abs(d)) if d.size else 0.0
    g = -d / scale if scale > 0 else np.zeros_like(d)
    update, saved = _optax_update(g, cfg, inputs.optimizer_state)
    if cfg.keep_total:
        update = update - np.dot(sizes, update) / sizes.sum()
    largest = np.max(np.abs(update)) if update.size else 0.0
    beta = update * (cfg.step_size / largest) if largest > cfg.step_size else update
    return beta, saved, None


# The reweight rules, by cfg.reweight.rule: the one place that names them (configs/common.py
# documents the choice; round.py asks only what a rule needs). docs/architecture.md, "Add a
# reweight rule".
RULES: dict[str, Rule] = {
    "paper": Rule(_paper_step, needs="alpha"),
    "optax": Rule(_optax_step, needs="alpha"),
    "outer": Rule(_outer_step, needs="outer", trust_region=True),
}
