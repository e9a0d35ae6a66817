"""Q(w) of a round, built from the influence stage's own pieces on a tiny LM (float32).

- jax.grad(Q) at the round's proportions is α from the production path (single-group domain
  gradients, EK-FAC operator, compute_alpha): "paper" scaling per unit of proportion, "exact"
  scaling per unit of β;
- away from them, jax.grad(Q) equals central finite differences of the same Q, and Q changes;
- the trust-region projection and the optimiser keep every volume within ±m and lower Q.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_curvature_models import lm_batches, tiny_lm

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients, outer
from ideal_jax.influence import outer_objective as oo

DOMAINS, CAPS = ("d0", "d1", "d2", "d3"), ("c0", "c1", "c2")


def _grouped(batches, n):
    """(group, batch) pairs with single-group batches, as the influence stage feeds them."""
    for b in batches:
        ids = np.asarray(b["domain_ids"])
        for g in range(n):
            keep = jnp.asarray(ids == g)
            if bool(keep.any()):
                yield g, {**b, "weights": b["weights"] * keep, "domain_ids": jnp.where(keep, g, -1)}


@pytest.fixture(scope="module")
def round_pieces():
    cfg, params = tiny_lm(vocab=32, hidden=16, inter=24, layers=1)
    layers = layers_lib.select_layers(params, "mlp")
    problem = problem_lib.lm_problem(cfg, layers)
    train = lm_batches(32, 4, 8, 12, num_domains=4, seed=2)
    ref = lm_batches(32, 2, 8, 12, num_domains=3, seed=7)
    curvature = kfac_lib.curvature_for(problem, "fisher")
    state = kfac_lib.accumulate_factors(curvature, params, train, jax.random.key(0))
    state = ekfac_lib.fit_eigen_correction(curvature, state, params, train, jax.random.key(1))
    op = operators.build_operator(
        "ekfac",
        problem=problem,
        params=params,
        curvature=curvature,
        state=state,
        damping=0.1,
        relative_damping=True,
    )
    dom = gradients.single_group_mean_gradients(problem, params, _grouped(train, 4), DOMAINS)
    refg = gradients.single_group_mean_gradients(problem, params, _grouped(ref, 3), CAPS)
    sizes = np.asarray(dom.weights, np.float64)
    p = sizes / sizes.sum()
    u = outer.directions(op, dom)
    ref_loss = outer.reference_loss_fn(problem, params, ref, len(CAPS), "capability")
    q_problem = outer.outer_problem(problem, params, u, p, ref_loss)
    return problem, op, dom, refg, sizes, p, q_problem


def test_grad_at_the_round_mixture_is_the_stage_alpha(round_pieces):
    problem, op, dom, refg, sizes, p, q_problem = round_pieces
    paper = alpha_lib.compute_alpha(refg, dom, op, layers=problem.layers, scaling="paper")
    exact = alpha_lib.compute_alpha(
        refg, dom, op, layers=problem.layers, scaling="exact", domain_sizes=sizes
    )
    q = oo.objective(q_problem)
    grad_w = np.asarray(jax.grad(q)(jnp.asarray(p, jnp.float32)))
    scale = np.abs(paper.row("all")).max()
    np.testing.assert_allclose(grad_w, paper.row("all"), rtol=1e-3, atol=1e-4 * scale)
    q_beta = oo.objective_of_beta(q_problem, sizes)
    grad_beta = np.asarray(jax.grad(q_beta)(jnp.zeros(4, jnp.float32)))
    np.testing.assert_allclose(grad_beta, exact.row("all"), rtol=1e-3, atol=1e-4 * scale)


def test_grad_elsewhere_is_the_finite_difference_of_q(round_pieces):
    *_, p, q_problem = round_pieces
    q = jax.jit(oo.objective(q_problem))
    w = jnp.asarray(p * np.array([1.4, 0.7, 1.2, 0.8]), jnp.float32)
    w = w / w.sum()
    grad = np.asarray(jax.grad(q)(w))
    eps = 2e-3
    fd = np.array(
        [(float(q(w.at[j].add(eps))) - float(q(w.at[j].add(-eps)))) / (2 * eps) for j in range(4)]
    )
    np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-2 * np.abs(fd).max())
    # Q really changes with w (it is not evaluated at θ* alone) and differs from its linearisation.
    q_p = float(q(jnp.asarray(p, jnp.float32)))
    assert abs(float(q(w)) - q_p) > 1e-4
    assert not np.allclose(grad, np.asarray(jax.grad(q)(jnp.asarray(p, jnp.float32))), rtol=1e-3)


def test_trust_region_projection():
    p = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    inside = jnp.asarray([0.105, 0.19, 0.31, 0.395])
    np.testing.assert_allclose(oo.project_trust_region(inside, p, 0.15), inside, atol=1e-6)
    far = jnp.asarray([0.4, 0.1, 0.1, 0.4])
    w = oo.project_trust_region(far, p, 0.15)
    assert abs(float(w.sum()) - 1) < 1e-6
    assert np.all(np.abs(np.asarray(w / p) - 1) <= 0.15 + 1e-6)
    assert float(w[0]) == pytest.approx(0.115) and float(w[1]) == pytest.approx(0.17)


def test_optimise_lowers_q_within_the_trust_region(round_pieces):
    *_, p, q_problem = round_pieces
    q = oo.objective(q_problem)
    result = oo.optimise(q_problem, trust_region=0.15, optimizer=optax.adam(0.05), steps=8)
    assert result.values.min() < result.values[0]
    assert np.all(np.diff(result.values) <= 0)  # a step that would raise Q is refused
    assert np.all(np.abs(result.proportions / p - 1) <= 0.15 + 1e-5)
    assert abs(result.proportions.sum() - 1) < 1e-5
    # The returned point is the best one seen, and Q there is what was recorded.
    best = float(q(jnp.asarray(result.proportions, jnp.float32)))
    assert best == pytest.approx(result.values.min(), rel=1e-5)
