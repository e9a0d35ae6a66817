"""The α matrix's rows and scalings away from a stationary point, where the −∇L̄_tr term matters.

Both properties are exact identities of Lemma 1's formula (α is linear in the reference gradient),
so they hold for any parameters, any operator, to float precision:
  - the "all" row is the mean of the capability rows ("capability" weighting, the default) or their
    token-weighted mean ("token");
  - "exact" scaling: α_j = p_j (α^paper_j − Σ_k p_k α^paper_k), so Σ_j α_j = 0 (Q depends only on
    the proportions). Dropping the −∇L̄_tr term breaks both at a non-stationary point.
"""

import jax
import numpy as np
import pytest
from test_curvature_models import classification_batches, mlp_params, mlp_problem

from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import operators
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients

DOMAINS = ("d0", "d1", "d2", "d3")


@pytest.fixture(scope="module")
def setup():
    params = mlp_params([5, 7, 3], seed=4)  # random: far from any stationary point
    problem = mlp_problem(params)
    train = classification_batches([5, 7, 3], 3, 24, num_domains=4, seed=5)
    ref = classification_batches([5, 7, 3], 2, 30, num_domains=3, seed=6)
    # Unequal reference token counts per capability: drop most rows of capability 0.
    ref = [
        {**b, "weights": b["weights"] * ((b["domain_ids"] != 0) | (np.arange(30) < 3))} for b in ref
    ]
    curvature = kfac_lib.KfacCurvature(problem, "fisher")
    state = kfac_lib.accumulate_factors(curvature, params, train, jax.random.key(0))
    op = operators.build_operator(
        "kfac",
        problem=problem,
        params=params,
        damping=0.1,
        curvature=curvature,
        state=state,
        relative_damping=True,
    )
    dom = gradients.group_mean_gradients(problem, params, train, DOMAINS)
    refg = gradients.group_mean_gradients(problem, params, ref, ("c0", "c1", "c2"))
    grad_norm = float(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(dom.overall)) ** 0.5)
    assert grad_norm > 1e-2, "the test needs a non-stationary point"
    return op, dom, refg, problem


def _alpha(setup, **kw):
    op, dom, refg, problem = setup
    return alpha_lib.compute_alpha(refg, dom, op, layers=problem.layers, **kw)


def test_all_row_weights_capabilities_equally_by_default(setup):
    _, _, refg, _ = setup
    assert refg.weights[0] < 0.5 * refg.weights[1]  # capability 0 has far fewer tokens
    result = _alpha(setup)
    caps = np.stack([result.row(c) for c in ("c0", "c1", "c2")])
    np.testing.assert_allclose(result.row("all"), caps.mean(axis=0), rtol=1e-5, atol=1e-7)
    assert result.to_json()["reference_weighting"] == "capability"
    token = _alpha(setup, reference_weighting="token")
    w = refg.weights / refg.weights.sum()
    np.testing.assert_allclose(token.row("all"), w @ caps, rtol=1e-5, atol=1e-7)
    assert not np.allclose(token.row("all"), result.row("all"), rtol=1e-3)


def test_exact_scaling_keeps_the_training_gradient_term(setup):
    sizes = [30.0, 50.0, 70.0, 90.0]
    exact = _alpha(setup, scaling="exact", domain_sizes=sizes).matrix
    paper = _alpha(setup, scaling="paper", domain_sizes=sizes).matrix
    p = np.asarray(sizes) / sum(sizes)
    expected = p * (paper - (paper @ p)[:, None])
    np.testing.assert_allclose(exact, expected, rtol=1e-4, atol=1e-6 * np.abs(paper).max())
    np.testing.assert_allclose(exact.sum(axis=1), 0.0, atol=1e-5 * np.abs(paper).max())
    # Without the −∇L̄_tr term the rows would not sum to zero here: the point is not stationary.
    assert np.abs((p * paper).sum(axis=1)).max() > 1e-3 * np.abs(paper).max()
