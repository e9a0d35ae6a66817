"""The α matrix of Lemma 1: how each reference loss changes with each domain's volume β_j.

Rows: reference subsets ("all" + each capability); columns: training domains. One inverse product
per reference row, v_r = H⁻¹ g_ref,r (H is symmetric), then dot products with the domain gradients:
  "paper":  α_rj = − v_r · ∇L̄_j                          (Lemma 1 as printed; public code)
  "exact":  α_rj = − (n_j / N) v_r · (∇L̄_j − ∇L̄_tr)      (exact ∂Q/∂β_j of Eq. 1–2 at β = 0)
with n_j the domain's size and ∇L̄_tr = Σ n_j ∇L̄_j / N (METHOD §1.1). n_j defaults to the domain's
response-token weight (the unit of our token-weighted loss); pass example counts to override. At an
exact stationary point ∇L̄_tr = 0 and "exact" = (n_j/N) × "paper".

The "all" row (the one that sets β) is the reference loss the mixture is optimised for:
  "capability"  (default) the mean over capabilities of each capability's mean loss, so every
                capability counts equally however long its answers are: g_all = mean_c ∇L̄_c
  "token"       the token-weighted mean over the whole reference set (long answers weigh more)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.curvature.operators import InverseOperator
from ideal_jax.influence.gradients import GroupGradients
from ideal_jax.utils.errors import InputError

SCALINGS = ("paper", "exact")
REFERENCE_WEIGHTINGS = ("capability", "token")


def tree_dot(a: dict, b: dict) -> jax.Array:
    """Σ over all leaves of a · b (float32)."""
    return sum(
        jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@dataclasses.dataclass(frozen=True)
class InfluenceResult:
    """α [rows, domains] with everything needed to reproduce it (written to influence.json)."""

    matrix: np.ndarray
    rows: tuple[str, ...]
    domains: tuple[str, ...]
    operator: str
    damping: dict
    layers: tuple[str, ...]
    scaling: str
    sigma: float | None
    domain_sizes: tuple[float, ...]
    reference_weighting: str = "capability"
    stderr: np.ndarray | None = None  # [rows, domains], see standard_errors

    def row(self, name: str = "all") -> np.ndarray:
        return self.matrix[self.rows.index(name)]

    def to_json(self) -> dict:
        return {
            "operator": self.operator,
            "damping": {k: float(v) for k, v in self.damping.items()},
            "layers": list(self.layers),
            "scaling": self.scaling,
            "reference_weighting": self.reference_weighting,
            "sigma": self.sigma,
            "rows": list(self.rows),
            "domains": list(self.domains),
            "domain_sizes": [float(x) for x in self.domain_sizes],
            "matrix": [[float(x) for x in r] for r in self.matrix],
            **({} if self.stderr is None else {"stderr": _nested(self.stderr)}),
        }


def _nested(m: np.ndarray) -> list:
    return [[None if not np.isfinite(x) else float(x) for x in r] for r in np.asarray(m)]


def reference_rows(reference: GroupGradients, reference_weighting: str = "capability") -> list:
    """[(row name, g_ref)]: "all" (capability- or token-weighted), then each capability."""
    if reference_weighting not in REFERENCE_WEIGHTINGS:
        raise InputError(
            f"unknown reference weighting {reference_weighting!r}; one of {REFERENCE_WEIGHTINGS}",
            field="influence.reference_weighting",
        )
    if reference_weighting == "capability":
        g_all = jax.tree.map(lambda x: jnp.mean(x, axis=0), reference.grads)
    else:
        g_all = reference.overall
    rows = [("all", g_all)]
    if len(reference.names) > 1 or reference.names[0] != "all":
        rows += [(n, reference.row(g)) for g, n in enumerate(reference.names)]
    return rows


def standard_errors(
    c_nr: np.ndarray,
    w_n: np.ndarray,
    group_n: np.ndarray,
    num_domains: int,
    *,
    scaling: str = "paper",
    domain_sizes: Sequence[float] | None = None,
) -> np.ndarray:
    """Standard errors [R, J] of α from the per-example terms of the subsample.

    Paper scaling: α_rj = Σ_{n∈j} c_nr / Σ_{n∈j} w_n (c_nr = −v_r · Σ_t w_t ∇ℓ_t), a ratio of
    sums over the domain's sampled examples; its delta-method variance is
      n_j/(n_j − 1) · Σ_n (c_nr − α_rj w_n)² / (Σ_n w_n)².
    Exact scaling: α_rj = −f_j (m_rj − Σ_k f_k m_rk) with m the paper-scaled means and f the size
    shares; domains are sampled independently, so
      Var = f_j² [(1 − f_j)² Var m_rj + Σ_{k≠j} f_k² Var m_rk].
    The error is that of the subsample's examples (the reference set is used whole); a domain with
    fewer than two examples gets NaN (null in JSON). No finite-population correction: this is the
    error against the domain's distribution, not against the round's finite mixture.
    """
    c_nr, w_n, group_n = np.asarray(c_nr, np.float64), np.asarray(w_n, np.float64), group_n
    var = np.full((c_nr.shape[1], num_domains), np.nan)
    for j in range(num_domains):
        mask = group_n == j
        n, total = int(mask.sum()), float(w_n[mask].sum())
        if n < 2 or total <= 0:
            continue
        a_r = c_nr[mask].sum(axis=0) / total
        resid = c_nr[mask] - a_r[None] * w_n[mask, None]
        var[:, j] = n / (n - 1) * np.sum(resid**2, axis=0) / total**2
    if scaling == "exact":
        sizes = np.asarray(domain_sizes, np.float64)
        f = sizes / sizes.sum()
        var_k = var * f[None] ** 2
        var = f[None] ** 2 * ((1 - f[None]) ** 2 * var + (var_k.sum(axis=1, keepdims=True) - var_k))
    return np.sqrt(var)


def alpha_from_terms(
    c_nr: np.ndarray,
    w_n: np.ndarray,
    group_n: np.ndarray,
    num_domains: int,
    *,
    scaling: str = "paper",
    domain_sizes: Sequence[float] | None = None,
) -> np.ndarray:
    """α [R, J] from the per-example terms alone (no gradients): the paper-scaled α_rj is
    m_rj = Σ_{n∈j} c_nr / Σ_{n∈j} w_n = −v_r · ∇L̄_j, and the exact one f_j (m_rj − Σ_k f_k m_rk).
    The same numbers `compute_alpha` forms from the domain gradients (up to float rounding); the
    α-error budget (influence/stage.py) reads them after each stage. A domain with no examples: NaN.
    """
    c_nr, w_n = np.asarray(c_nr, np.float64), np.asarray(w_n, np.float64)
    m = np.full((c_nr.shape[1], num_domains), np.nan)
    for j in range(num_domains):
        mask = np.asarray(group_n) == j
        total = float(w_n[mask].sum())
        if total > 0:
            m[:, j] = c_nr[mask].sum(axis=0) / total
    if scaling != "exact":
        return m
    f = np.asarray(domain_sizes, np.float64)
    f = f / f.sum()
    return f[None] * (m - (m * f[None]).sum(axis=1, keepdims=True))


def compute_alpha(
    reference: GroupGradients,
    domains: GroupGradients,
    inverse: InverseOperator,
    *,
    layers: Sequence[str],
    scaling: str = "paper",
    domain_sizes: Sequence[float] | None = None,
    sigma: float | None = None,
    reference_weighting: str = "capability",
    inverse_vectors: Sequence[dict] | None = None,
) -> InfluenceResult:
    """α for rows ("all", *reference.names) × columns domains.names (Lemma 1).

    `inverse_vectors`: H⁻¹ g_ref,r per row, when the caller already has them.
    """
    if scaling not in SCALINGS:
        raise InputError(
            f"unknown scaling {scaling!r}; one of {SCALINGS}", field="influence.scaling"
        )
    sizes = np.asarray(domains.weights if domain_sizes is None else domain_sizes, np.float64)
    if sizes.shape != (len(domains.names),) or np.any(sizes <= 0):
        raise InputError(
            f"domain_sizes must be {len(domains.names)} positive numbers",
            field="domain_sizes",
        )
    ref_rows = reference_rows(reference, reference_weighting)
    if inverse_vectors is not None and len(inverse_vectors) != len(ref_rows):
        raise ValueError(f"{len(inverse_vectors)} inverse vectors for {len(ref_rows)} rows")
    domain_grads = [domains.row(j) for j in range(len(domains.names))]
    if scaling == "exact":
        frac = sizes / sizes.sum()
        g_tr = jax.tree.map(
            lambda x: jnp.tensordot(jnp.asarray(frac, jnp.float32), x, axes=1), domains.grads
        )
        domain_grads = [jax.tree.map(jnp.subtract, g, g_tr) for g in domain_grads]
        factor = frac
    else:
        factor = np.ones_like(sizes)
    matrix = np.zeros((len(ref_rows), len(domain_grads)))
    for r, (_, g_ref) in enumerate(ref_rows):
        # one inverse product per reference row (or the caller's, already computed)
        v = inverse(g_ref) if inverse_vectors is None else inverse_vectors[r]
        dots = np.asarray([float(tree_dot(v, g)) for g in domain_grads])
        matrix[r] = -factor * dots
    if not np.all(np.isfinite(matrix)):
        raise InputError(
            "influence α is not finite (check damping and the curvature state)",
            field="curvature.damping",
        )
    return InfluenceResult(
        matrix=matrix,
        rows=tuple(n for n, _ in ref_rows),
        domains=tuple(domains.names),
        operator=inverse.name,
        damping=dict(inverse.damping),
        layers=tuple(layers),
        scaling=scaling,
        sigma=sigma,
        domain_sizes=tuple(sizes),
        reference_weighting=reference_weighting,
    )
