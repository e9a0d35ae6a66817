"""β: the new domain volumes, computed from the hypergradient α (METHOD.md §1.2).

Domain i enters the next round's training with weight (1 + β_i), i.e. (1 + β_i)·|D_i| examples
(the resampling itself lives in ideal_jax.data.mixture). Three update rules:

  "paper"       β = −(m / max_j |α_j|) · α          the domain with the largest |α| moves by ±m
  "optax"       β ← project(β − optax_update(α))   any optax optimizer on the outer objective
  (keep-total is a property of the mixture, applied after either rule: all volumes are rescaled so
   the total stays N; the manifest records which was used.)

Both respect bounds on β and a minimum volume per domain. Pure functions of arrays: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class ReweightConfig:
    rule: str = "paper"  # "paper" | "optax"
    step_size: float = 0.15  # m; the paper tried 0.1, 0.15, 0.3 and recommends 0.15
    beta_min: float = -0.9  # never drop more than 90% of a domain in one round
    beta_max: float = 3.0
    min_volume: int = 1  # examples a domain keeps at least
    optimizer: str = "sgd"  # for rule="optax": an optax constructor name
    learning_rate: float = 1.0
    keep_total: bool = True  # rescale volumes so the total stays N (equal training tokens)

    @classmethod
    def from_config_dict(cls, section) -> ReweightConfig:
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def max_normalized_step(alpha_j: np.ndarray, step_size: float) -> np.ndarray:
    """The paper's update: β = −(m / max_j |α_j|) · α (all zeros when α is zero)."""
    alpha_j = np.asarray(alpha_j, np.float64)
    if not np.all(np.isfinite(alpha_j)):
        raise ValueError(f"α has non-finite entries: {alpha_j.tolist()}")
    scale = np.max(np.abs(alpha_j)) if alpha_j.size else 0.0
    if scale == 0.0:
        return np.zeros_like(alpha_j)
    # α_j = ∂Q/∂β_j (Lemma 1): moving against it lowers the reference loss.
    return -(step_size / scale) * alpha_j


def project_beta(beta_j: np.ndarray, sizes_j: Sequence[int], cfg: ReweightConfig) -> np.ndarray:
    """Clip β to [beta_min, beta_max] and keep at least `min_volume` examples per domain."""
    sizes_j = np.asarray(sizes_j, np.float64)
    floor_j = np.maximum(cfg.beta_min, cfg.min_volume / np.maximum(sizes_j, 1.0) - 1.0)
    return np.clip(np.asarray(beta_j, np.float64), floor_j, cfg.beta_max)


def optax_step(alpha_j: np.ndarray, beta_j: np.ndarray, opt_state, optimizer):
    """One optax update of β along the outer gradient α; returns (β, opt_state)."""
    grads = jnp.asarray(alpha_j, jnp.float32)
    params = jnp.asarray(beta_j, jnp.float32)
    if opt_state is None:
        opt_state = optimizer.init(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return np.asarray(optax.apply_updates(params, updates), np.float64), opt_state


def make_optimizer(cfg: ReweightConfig) -> optax.GradientTransformation:
    if not hasattr(optax, cfg.optimizer):
        raise ValueError(f"reweight.optimizer={cfg.optimizer!r} is not an optax optimizer")
    return getattr(optax, cfg.optimizer)(cfg.learning_rate)


def compute_beta(
    alpha_j: np.ndarray,
    sizes_j: Sequence[int],
    cfg: ReweightConfig,
    previous_beta_j: np.ndarray | None = None,
    opt_state=None,
):
    """β for the next round from the α row of the reference set; returns (β, opt_state).

    The "paper" rule is memoryless (each round starts from the current mixture, β = 0); the
    "optax" rule continues from the previous round's β and optimizer state.
    """
    if cfg.rule == "paper":
        beta_j = max_normalized_step(alpha_j, cfg.step_size)
    elif cfg.rule == "optax":
        start = np.zeros(len(sizes_j)) if previous_beta_j is None else previous_beta_j
        beta_j, opt_state = optax_step(alpha_j, start, opt_state, make_optimizer(cfg))
    else:
        raise ValueError(f"reweight.rule must be 'paper' or 'optax', got {cfg.rule!r}")
    return project_beta(beta_j, sizes_j, cfg), opt_state
