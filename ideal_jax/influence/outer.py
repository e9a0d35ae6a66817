"""The outer objective Q of a round, built from the influence stage's own pieces.

The stage has θ* (the trained model), the inverse operator H⁻¹ and the domain mean gradients ∇L̄_j;
this module adds the directions u_j = H⁻¹ ∇L̄_j and the reference loss as a JAX function of the
curvature-covered parameters, so that `outer_objective.objective(problem)` is Q(w) for the round.
The reference loss matches the α row "all": the mean over capabilities of each capability's mean
response-token loss ("capability"), or the token-weighted mean over the whole set ("token").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.operators import InverseOperator
from ideal_jax.curvature.problem import CurvatureProblem, Params, flat_rows, row_losses
from ideal_jax.influence.gradients import GroupGradients
from ideal_jax.influence.outer_objective import OuterProblem
from ideal_jax.utils.errors import InputError


def reference_loss_fn(
    problem: CurvatureProblem,
    params: Params,
    batches: Sequence[dict],
    num_groups: int,
    weighting: str = "capability",
):
    """(L_ref, args): L_ref(selected-layer params, args) is the reference loss, a scan over the
    stacked reference batches. Batches carry `domain_ids` = capability index per token (−1 for
    padding) and 0/1 `weights`.
    """
    if not batches:
        raise InputError("no reference batches", field="data.reference")
    _, rest = layers_lib.split_params(params, problem.layers)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[dict(b) for b in batches])
    return _reference_loss(problem, num_groups, weighting), (rest, stacked)


@functools.lru_cache(maxsize=16)
def _reference_loss(problem: CurvatureProblem, num_groups: int, weighting: str):
    """(selected, (rest, stacked batches)) -> reference loss; one function object per setting, so
    jitted callers compile once per process."""

    def group_sums(selected, rest, batch):
        outputs = problem.outputs_fn(layers_lib.merge_params(selected, rest), batch, frozenset())
        outputs_rc, targets, weights_r, _ = flat_rows(problem, outputs, batch)
        losses_r = weights_r * row_losses(problem, outputs_rc, targets)
        onehot_rg = jax.nn.one_hot(batch["domain_ids"].reshape(-1), num_groups, dtype=jnp.float32)
        return losses_r @ onehot_rg, weights_r @ onehot_rg

    def loss(selected, args):
        rest, stacked = args

        def body(acc, batch):
            s, w = group_sums(selected, rest, batch)
            return (acc[0] + s, acc[1] + w), None

        zeros = jnp.zeros((num_groups,), jnp.float32)
        (sums_g, weights_g), _ = jax.lax.scan(body, (zeros, zeros), stacked)
        if weighting == "capability":
            return jnp.mean(sums_g / jnp.maximum(weights_g, 1e-30))
        return jnp.sum(sums_g) / jnp.maximum(jnp.sum(weights_g), 1e-30)

    return loss


def directions(operator: InverseOperator, domain_grads: GroupGradients) -> dict:
    """u_j = H⁻¹ ∇L̄_j for every domain, stacked on a leading [J] axis."""
    rows = [operator(domain_grads.row(j)) for j in range(len(domain_grads.names))]
    return jax.tree.map(lambda *u: jnp.stack(u), *rows)


def outer_problem(
    problem: CurvatureProblem,
    params: Params,
    directions_j: dict,
    proportions_j: np.ndarray,
    ref_loss_and_args,
) -> OuterProblem:
    selected, _ = layers_lib.split_params(params, problem.layers)
    p = np.asarray(proportions_j, np.float64)
    if p.ndim != 1 or np.any(p <= 0) or abs(p.sum() - 1) > 1e-6:
        raise InputError(f"proportions must be positive and sum to 1, got {p.tolist()}")
    ref_loss, ref_args = ref_loss_and_args
    return OuterProblem(
        theta_star=selected,
        directions=directions_j,
        proportions=jnp.asarray(p, jnp.float32),
        ref_args=ref_args,
        ref_loss=ref_loss,
    )
