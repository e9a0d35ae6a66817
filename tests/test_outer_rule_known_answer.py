"""The "outer" rule against the paper's one-step rule on the known-answer model (re-solved θ*).

Logistic regression with a needed, a harmful and a neutral domain (tests/test_known_answer.py).
Each round: α and Q's pieces at the current mixture (EK-FAC, the default operator), one step of
the rule (trust region m = 0.15 per round for both), then θ* re-solved exactly by Newton on the new
mixture and the *true* reference loss measured. Measured (this file's numbers):

  round | paper: true Q | outer: true Q | outer: Q's prediction (error)
  1     | 1.05867       | 1.05298       | 1.05725 (+0.0043)
  2     | 1.04228       | 1.03462       | 1.03890 (+0.0043)
  3     | 1.02729       | 1.02223       | 1.02491 (+0.0027)
(start 1.07613; with the exact Hessian the prediction errors are ≤ 5e-4.) The paper's step is the
max-normalised projected α; the outer rule goes to the vertex the first-order Q prefers (needed
+m, harmful −m), so after three rounds its true reference loss is 0.005 lower.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_known_answer as ka

from configs import common
from ideal_jax import reweight
from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients, outer

SIZES = np.asarray(list(ka.SIZES.values()), float)
PROBLEM = problem_lib.CurvatureProblem(ka.linear_outputs, ("fc0",), token_mask_key=None)


def _round_pieces(params, weights_j, train_batch, ref_batch, operator):
    doms = np.asarray(train_batch["domain_ids"])
    weighted = {**train_batch, "weights": jnp.asarray(weights_j[doms], jnp.float32)}
    n = len(doms)
    batches = [jax.tree.map(lambda x, i=i: x[i : i + 100], weighted) for i in range(0, n, 100)]
    curvature = state = None
    if operator == "ekfac":
        curvature = kfac_lib.KfacCurvature(PROBLEM, "fisher")
        state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(0))
        state = ekfac_lib.fit_eigen_correction(curvature, state, params, batches, jax.random.key(1))
    op = operators.build_operator(
        operator,
        problem=PROBLEM,
        params=params,
        damping=1e-3 if operator == "exact" else 0.1,
        curvature=curvature,
        state=state,
        batches=batches,
        exact_kind="hessian",
        relative_damping=True,
    )
    dom = gradients.group_mean_gradients(PROBLEM, params, batches, tuple(ka.SIZES))
    ref = gradients.group_mean_gradients(PROBLEM, params, [ref_batch], ("all",))
    alpha = alpha_lib.compute_alpha(ref, dom, op, layers=PROBLEM.layers).row("all")
    volumes = weights_j * SIZES
    ref_loss = (lambda theta, batch: ka.mean_loss(theta, batch), ref_batch)
    q_problem = outer.outer_problem(
        PROBLEM, params, outer.directions(op, dom), volumes / volumes.sum(), ref_loss
    )
    return alpha, q_problem


def _run(rule, fitted, operator="ekfac", rounds=3):
    params, train_batch, ref_batch, _ = fitted
    weights_j = np.ones(len(SIZES))
    cfg = reweight.ReweightConfig.from_config_dict(
        common.base_config().reweight, rule=rule, step_size=0.15
    )
    trace = []
    for _ in range(rounds):
        alpha, q_problem = _round_pieces(params, weights_j, train_batch, ref_batch, operator)
        volumes = np.round(weights_j * SIZES).astype(int)
        step = reweight.compute_step(alpha, volumes, cfg, None, q_problem)
        assert np.all(np.abs(step.beta_nominal) <= 0.15 + 1e-9)  # the same trust region for both
        weights_j = weights_j * (1 + step.beta_nominal)
        params = ka.newton(
            params, train_batch, jnp.asarray(weights_j[np.asarray(train_batch["domain_ids"])])
        )
        true_q = float(ka.mean_loss(params, ref_batch))
        predicted = step.objective["predicted_reference_loss"] if step.objective else None
        trace.append((true_q, predicted))
    return trace


@pytest.fixture(scope="module")
def fitted():
    train_batch, ref_batch = ka.make_data()
    return ka.train(train_batch), train_batch, ref_batch, None


def test_outer_rule_reaches_a_lower_true_reference_loss_than_the_paper_rule(fitted):
    paper = _run("paper", fitted)
    outer_trace = _run("outer", fitted)
    q0 = float(ka.mean_loss(fitted[0], fitted[2]))
    assert paper[-1][0] < q0 and outer_trace[-1][0] < q0
    assert outer_trace[-1][0] < paper[-1][0] - 0.002, (paper, outer_trace)
    # Q's prediction of the retrained model's reference loss (measured ≤ 0.0043 with EK-FAC).
    for true_q, predicted in outer_trace:
        assert abs(predicted - true_q) < 0.01, outer_trace


def test_with_the_exact_hessian_the_prediction_is_within_1e_3(fitted):
    ((true_q, predicted),) = _run("outer", fitted, operator="exact", rounds=1)
    assert abs(predicted - true_q) < 1e-3
