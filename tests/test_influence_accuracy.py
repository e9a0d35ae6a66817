"""K-FAC / EK-FAC α versus α from the exact damped GGN inverse, on ≥ 4 synthetic domains.

Measured (see the report table); thresholds sit below the measured values with margin for seeds.
"""

import jax
import numpy as np
import pytest
from scipy.stats import spearmanr
from test_curvature_models import (
    classification_batches,
    lm_batches,
    mlp_params,
    mlp_problem,
    tiny_lm,
)

from configs.common import base_config
from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients

DOMAINS = ("d0", "d1", "d2", "d3", "d4", "d5")


def _measure(problem, params, train, reference, mode="fisher", damping=0.1):
    """α per operator, and cosine / Spearman of each against the exact damped GGN."""
    curvature = kfac_lib.KfacCurvature(problem, mode)
    state = kfac_lib.accumulate_factors(curvature, params, train, jax.random.key(0))
    state = ekfac_lib.fit_eigen_correction(curvature, state, params, train, jax.random.key(1))
    dom = gradients.group_mean_gradients(problem, params, train, DOMAINS)
    ref = gradients.group_mean_gradients(problem, params, reference, ("c0", "c1"))
    alphas = {}
    for name in ("identity", "kfac", "ekfac", "exact_block", "exact"):
        op = operators.build_operator(
            name,
            problem=problem,
            params=params,
            damping=damping,
            curvature=curvature,
            state=state,
            batches=train,
            exact_kind="ggn",
            relative_damping=True,
        )
        alphas[name] = alpha_lib.compute_alpha(ref, dom, op, layers=problem.layers).matrix
    exact = alphas["exact"].ravel()
    metrics = {}
    for name, a in alphas.items():
        a = a.ravel()
        cos = float(a @ exact / (np.linalg.norm(a) * np.linalg.norm(exact)))
        metrics[name] = (cos, float(spearmanr(a, exact).statistic))
    return metrics


def mlp_metrics(mode="fisher"):
    sizes = (6, 16, 5)
    params = mlp_params(sizes)
    train = classification_batches(sizes, 8, 64, num_domains=len(DOMAINS), seed=1)
    reference = [
        {**b, "domain_ids": b["domain_ids"] % 2}
        for b in classification_batches(sizes, 2, 64, len(DOMAINS), seed=5)
    ]
    return _measure(mlp_problem(params), params, train, reference, mode=mode)


def lm_metrics():
    cfg, params = tiny_lm()
    train = lm_batches(cfg.vocab_size, 6, 8, 12, num_domains=len(DOMAINS), seed=2)
    reference = [
        {**b, "domain_ids": np.where(b["domain_ids"] >= 0, b["domain_ids"] % 2, -1)}
        for b in lm_batches(cfg.vocab_size, 2, 8, 12, len(DOMAINS), seed=7)
    ]
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    return _measure(problem, params, train, reference)


def _print(title, metrics):
    print(f"\n{title}: operator  cosine  spearman")
    for name, (c, s) in metrics.items():
        print(f"  {name:12s} {c:7.4f} {s:7.4f}")


@pytest.mark.slow
def test_alpha_accuracy_mlp():
    m = mlp_metrics()
    _print("MLP", m)
    assert m["exact"][0] > 0.9999
    # measured: kfac 0.94 / 0.93, ekfac 0.92 / 0.88, identity 0.73 / 0.56
    for name in ("kfac", "ekfac"):
        assert m[name][0] > 0.85 and m[name][1] > 0.8 and m[name][0] > m["identity"][0]


@pytest.mark.slow
def test_alpha_accuracy_tiny_lm():
    m = lm_metrics()
    _print("tiny LM", m)
    # measured: kfac 0.84 / 0.91, ekfac 0.82 / 0.85, identity 0.36 / 0.47
    for name in ("kfac", "ekfac"):
        assert m[name][0] > 0.75 and m[name][1] > 0.75 and m[name][0] > m["identity"][0]


@pytest.mark.integration  # ~10 s on 2 cores with a cold compile cache: kept out of the unit tier
def test_alpha_accuracy_default_estimator():
    """Fast (default-suite) accuracy check of the estimator the project runs by default.

    The MLP of `test_alpha_accuracy_mlp` with the estimator read from configs/common.py. Measured
    (cosine / Spearman vs the exact damped GGN over 3 reference rows × 6 domains; data seeds 0–3,
    rng keys = seed; the test's case is seed 0):
      fisher     kfac 0.94/0.92, 0.90/0.84, 0.84/0.76, 0.87/0.77
                 ekfac 0.93/0.88, 0.91/0.86, 0.85/0.80, 0.87/0.76
      empirical  kfac 0.95/0.94, 0.90/0.84, 0.79/0.70, 0.82/0.57
                 ekfac 0.95/0.94, 0.87/0.78, 0.79/0.72, 0.78/0.57
    On this fast case (and on the tiny LM at init, whose random targets are nearly distributed as
    the model predicts: seeds 0–6 gave fisher ≈ empirical, either one ahead) the gap between the
    estimators is NOT reliable, so the thresholds are set by the fisher numbers only (below the
    worst seed with margin): the test guards the default estimator's accuracy, and it does not
    by itself tell "fisher" from "empirical".
    """
    mode = base_config().curvature.estimator
    m = mlp_metrics(mode)
    _print(f"MLP, estimator {mode!r}", m)
    assert m["exact"][0] > 0.9999
    for name in ("kfac", "ekfac"):
        assert m[name][0] > 0.8 and m[name][1] > 0.7, (mode, name, m[name])
        assert m[name][0] > m["identity"][0], (mode, name, m)


def test_default_estimator_is_the_models_fisher():
    """The default estimator's output factor G is the model's Fisher (the GGN's, kfac-jax's
    ggn_exact) up to sampling error — not the empirical one at the data's targets.

    A peaked softmax classifier on random labels, where the two differ: 2,048 rows, so the true
    Fisher's one draw per row averages out. Measured: G relative error 0.09 / 0.08 (the two layers)
    with "fisher", 2.7 / 3.2 with "empirical"; A is the same for every estimator (1e-8).
    """
    sizes = (6, 16, 5)
    params = mlp_params(sizes)
    params["fc1"]["kernel"] = params["fc1"]["kernel"] * 6.0
    batch = classification_batches(sizes, 1, 2048, num_domains=len(DOMAINS), seed=1)[0]
    labels = np.random.default_rng(3).integers(0, sizes[-1], 2048)
    batch = {**batch, "targets": jax.numpy.asarray(labels, jax.numpy.int32)}

    def factors(mode):
        curvature = kfac_lib.KfacCurvature(mlp_problem(params), mode)
        state = kfac_lib.accumulate_factors(curvature, params, [batch], jax.random.key(0))
        return [tuple(np.asarray(f.value) for f in b.factors) for b in state.kfac.blocks_states]

    mode = base_config().curvature.estimator
    for (a, g), (a_x, g_x) in zip(factors(mode), factors("ggn_exact"), strict=True):
        np.testing.assert_allclose(a, a_x, rtol=1e-5, atol=1e-7)
        err = float(np.linalg.norm(g - g_x) / np.linalg.norm(g_x))
        assert err < 0.3, (mode, err)
