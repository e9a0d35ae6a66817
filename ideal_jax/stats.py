"""Paired statistics over seeds: mean, 95% confidence interval (Student t), significance.

Every method in a comparison is trained with the same initialisation and training seed as D0 for
each seed, so the unit of evidence is the per-seed *difference* to D0: its mean and a t interval
over seeds (n − 1 degrees of freedom). A difference is significant when its interval excludes 0.
With one seed there is no interval: the number is reported with `ci95 = None` and the table says
that it cannot separate an effect from training noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (standard tables).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """t_{0.975} with `df` degrees of freedom (table to 30, then the Cornish–Fisher expansion)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """{mean, ci95 (half-width, None for one value), std, n} of `values` (NaNs are dropped)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    if n == 1:
        return {"mean": float(x[0]), "ci95": None, "std": None, "n": 1}
    std = float(x.std(ddof=1))
    return {"mean": float(x.mean()), "ci95": t975(n - 1) * std / math.sqrt(n), "std": std, "n": n}


def paired(values: Sequence[float], baseline: Sequence[float]) -> dict[str, object]:
    """Per-seed differences values − baseline: mean, ci95, and whether the CI excludes 0."""
    if len(values) != len(baseline):
        raise ValueError(f"{len(values)} values paired with {len(baseline)} baseline values")
    diffs = [float(a) - float(b) for a, b in zip(values, baseline)]
    out: dict[str, object] = dict(mean_ci(diffs))
    mean, ci = out["mean"], out["ci95"]
    out["significant"] = bool(ci is not None and mean is not None and abs(mean) > ci)
    out["per_seed"] = diffs
    return out


def summarise_methods(
    scores: Mapping[str, Sequence[Mapping[str, float]]], baseline: str = "d0"
) -> dict[str, dict[str, object]]:
    """scores[method][seed_index] = {capability: score, ..., "average": score}.

    Per method and metric: mean ± ci95 over seeds, and the paired difference to `baseline`.
    """
    base = scores[baseline]
    out: dict[str, dict[str, object]] = {}
    for method, per_seed in scores.items():
        if len(per_seed) != len(base):
            raise ValueError(f"{method}: {len(per_seed)} seeds, {baseline} has {len(base)}")
        metrics = list(per_seed[0]) if per_seed else []
        out[method] = {
            metric: {
                **mean_ci([s[metric] for s in per_seed]),
                "vs_" + baseline: paired([s[metric] for s in per_seed], [b[metric] for b in base]),
            }
            for metric in metrics
        }
    return out


def regret(summary: Mapping[str, Mapping[str, Mapping[str, object]]], metric: str = "average"):
    """The gap between D0 and the best method (by mean `metric`), and each method's share of it.

    share = (method − D0) / (best − D0); None when the best is not above D0 (nothing to close).
    """
    means = {m: s[metric]["mean"] for m, s in summary.items() if s[metric]["mean"] is not None}
    best = max(means, key=means.get)
    gap = means[best] - means["d0"]
    return {
        "metric": metric,
        "best_method": best,
        "d0": means["d0"],
        "best": means[best],
        "gap": gap,
        "share_closed": {m: (v - means["d0"]) / gap if gap > 0 else None for m, v in means.items()},
    }
