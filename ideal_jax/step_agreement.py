"""How well an α measured on a subsample agrees with a reference α
(benchmarks/bench_alpha_budget.py).

The step uses α only through its direction: β = m · d / max_j |d_j| (reweight.py, rule "paper"),
d = −α or its keep-total projection. So two αs agree as far as the steps they produce agree:

  cosine      cos(d, d_ref): 1 = the same direction, 0 = unrelated;
  max_dbeta   max_j |β_j − β_ref_j| / m: how far the worst domain's step is off, in units of the
              step (2 = a domain moved by +m where the reference moves it by −m);
  sign_agree  the fraction of domains moved the same way (ties count as agreeing only with ties);
  coverage    the fraction of domains with |α_j − α_ref_j| ≤ z · se_j: how often α's reported
              standard error covers the error it actually has (≈ 0.95 at z = 1.96 if se_j were
              the whole error and α unbiased).

Pure functions of arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ideal_jax import reweight


def unit_step(alpha_j, sizes_j: Sequence[int], keep_total: bool) -> np.ndarray:
    """β / m: the paper rule's step for α, before bounds (zeros when d is zero)."""
    return reweight.max_normalized(reweight.direction(alpha_j, sizes_j, keep_total), 1.0)


def step_agreement(alpha_j, ref_j, sizes_j: Sequence[int], keep_total: bool) -> dict[str, float]:
    """{cosine, max_dbeta, sign_agree} of α's step against the reference α's step."""
    b, r = unit_step(alpha_j, sizes_j, keep_total), unit_step(ref_j, sizes_j, keep_total)
    norm = float(np.linalg.norm(b) * np.linalg.norm(r))
    return {
        "cosine": float(np.dot(b, r) / norm) if norm > 0 else float("nan"),
        "max_dbeta": float(np.max(np.abs(b - r))),
        "sign_agree": float(np.mean(np.sign(b) == np.sign(r))),
    }


def se_coverage(alpha_j, se_j, ref_j, z: float = 1.96) -> float:
    """Fraction of domains whose α is within z reported standard errors of the reference α."""
    alpha_j, se_j, ref_j = (np.asarray(v, np.float64) for v in (alpha_j, se_j, ref_j))
    return float(np.mean(np.abs(alpha_j - ref_j) <= z * se_j))
