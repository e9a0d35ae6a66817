"""The mixtures the baselines propose (pure functions; training them is ideal_jax/compare/run.py).

  uniform   the same number of examples from every domain
  random    k Dirichlet draws of domain proportions (the paper's "Random"); the best on the
            reference loss is the baseline "Random (best)"
  regmix    RegMix (Liu et al. 2024): a regression from the k random runs' proportions to their
            reference loss, minimised over many simulated proportions (the mean of the best
            `top` predicted ones, as RegMix does, rather than the regression's single vertex)
  doremi    ideal_jax/compare/doremi.py (Group DRO proxy against a reference model)

Every final mixture has the same total number of examples as D0 (equal training tokens up to
the domains' example lengths; the comparison reports the tokens each run saw).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ideal_jax.data import mixture as mixture_lib
from ideal_jax.utils.errors import InputError


def uniform_weights(num_domains: int) -> np.ndarray:
    return np.full(num_domains, 1.0 / num_domains)


def dirichlet_weights(k: int, num_domains: int, seed: int, concentration: float) -> np.ndarray:
    """[k, J] proportions drawn from Dirichlet(concentration · 1), deterministic in seed."""
    rng = np.random.default_rng([seed, 0x5EED])
    return rng.dirichlet(np.full(num_domains, float(concentration)), size=k)


def mixture_from_weights(
    domain_ids: Mapping[str, Sequence[str]],
    weights: Sequence[float],
    total: int,
    seed: int,
    *,
    pools: Mapping[str, Sequence[str]] | None = None,
    upsample: str = "repeat",
) -> mixture_lib.Mixture:
    """The mixture with round(w_j · total) examples of domain j (exactly `total` in all).

    `domain_ids` is D0 (β is relative to it). A domain that grows past D0 takes what the
    `upsample` policy says, as IDEAL's own rounds do (mixture.resample_from): with
    "fresh_first" and `pools`, examples of its pool that D0 does not hold before any repeat;
    with "repeat", entries of D0 repeated.
    """
    names = list(domain_ids)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(names),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"proportions {w.tolist()} for domains {names}", field="weights")
    w = w / w.sum()
    sizes = np.array([len(domain_ids[n]) for n in names], dtype=np.float64)
    if np.any(sizes == 0):
        raise InputError("a domain has no examples", field="data.domains")
    beta = w * total / sizes - 1.0
    mix = mixture_lib.build_mixture(domain_ids, beta.tolist(), seed=seed, keep_total=True)
    if mix.total != total:  # keep_total keeps the source total; rescale if D0's differs
        raise InputError(f"mixture total {mix.total} != {total}", field="weights")
    if upsample == "fresh_first" and pools:
        d0 = mixture_lib.build_mixture(domain_ids, None, seed=seed, keep_total=True)
        grown = mixture_lib.resample_from(
            d0, mix.target_sizes, seed=seed, pools=pools, upsample=upsample
        )
        mix = dataclasses.replace(
            grown,
            beta=mix.beta,
            unrounded_targets=mix.unrounded_targets,
            step_beta=mix.step_beta,
            step_beta_nominal=mix.step_beta_nominal,
        )
    return mix


def fit_regmix(weights_nj: np.ndarray, losses_n: np.ndarray, lambdas=None) -> dict[str, object]:
    """Ridge regression loss ≈ Σ_j c_j w_j (the simplex makes an intercept redundant).

    The ridge strength is chosen by leave-one-out error over `lambdas`; returns the coefficients,
    the chosen λ and its leave-one-out RMSE (the regression's honest error).
    """
    x = np.asarray(weights_nj, dtype=np.float64)
    y = np.asarray(losses_n, dtype=np.float64)
    n, j = x.shape
    if n < 2:
        raise InputError(f"RegMix needs at least 2 runs to fit, got {n}", field="compare.k")
    lambdas = (1e-4, 1e-3, 1e-2, 1e-1, 1.0) if lambdas is None else lambdas
    y_mean = y.mean()

    def solve(xs, ys, lam):  # centred target, ridge on the proportions
        return np.linalg.solve(xs.T @ xs + lam * np.eye(j), xs.T @ (ys - y_mean))

    best = None
    for lam in lambdas:
        errors = [
            (x[i] @ solve(np.delete(x, i, 0), np.delete(y, i), lam) + y_mean - y[i]) ** 2
            for i in range(n)
        ]
        rmse = float(np.sqrt(np.mean(errors)))
        if best is None or rmse < best[1]:
            best = (lam, rmse)
    coef = solve(x, y, best[0])
    return {
        "coef": coef.tolist(),
        "intercept": float(y_mean),
        "ridge": best[0],
        "loo_rmse": best[1],
    }


def predict_regmix(model: Mapping[str, object], weights_nj: np.ndarray) -> np.ndarray:
    return np.asarray(weights_nj) @ np.asarray(model["coef"]) + float(model["intercept"])


def propose_regmix(
    model: Mapping[str, object],
    num_domains: int,
    seed: int,
    concentration: float,
    candidates: int,
    top: int,
) -> np.ndarray:
    """The mean of the `top` simulated proportions (Dirichlet draws) with the lowest prediction
    (cfg.compare.regmix_candidates and regmix_top: defaults in configs/common.py)."""
    rng = np.random.default_rng([seed, 0x12E6])
    sims = rng.dirichlet(np.full(num_domains, float(concentration)), size=candidates)
    best = np.argsort(predict_regmix(model, sims), kind="stable")[:top]
    return sims[best].mean(axis=0)
