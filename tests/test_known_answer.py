"""One IDEAL step on a problem whose answer is known: it must upweight the needed domain and
downweight the harmful one, and the step it proposes must actually lower the reference loss.

Three synthetic classification domains for multinomial logistic regression (one dense layer):
  needed   (60 examples)  inputs around μ_A, labels from rule A — the reference set's distribution
  harmful (120 examples)  the same input distribution, labels shifted by one class: contradicts A
  neutral (320 examples)  inputs around μ_C far away, its own rule
The reference set is a fresh sample of the needed domain. At the trained optimum the harmful
domain outvotes the needed one on the shared inputs, so more `needed` lowers the reference loss
(α < 0, β > 0) and more `harmful` raises it (α > 0, β < 0). The loss is convex and tiny (P = 21),
so θ*(β) is re-solved by Newton's method in float64, which gives the ground truth
dQ/dβ_j by central differences — independent of the library's influence code.
"""

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from configs import common
from ideal_jax import reweight
from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients

D_IN, CLASSES = 6, 3
SIZES = {"needed": 60, "harmful": 120, "neutral": 320}
RULE_SCALE = 0.5  # small logits: noisy labels, so no class is separable and θ* is finite
NEEDED, HARMFUL = 0, 1


def linear_outputs(params, batch, tagged):
    """Multinomial logistic regression x W + b (kfac-jax dense block "fc0" when tagged)."""
    x, layer = batch["inputs"], params["fc0"]
    y = x @ layer["kernel"] + layer["bias"]
    if "fc0" in tagged:
        y = kfac_jax.register_dense(y, x, layer["kernel"], layer["bias"])
    return y


def make_data(seed=0):
    """(train batch with domain_ids, reference batch): see the module docstring."""
    rng = np.random.default_rng(seed)
    mu_a, mu_c = rng.normal(size=D_IN), 3.0 + rng.normal(size=D_IN)
    rule_a, rule_c = RULE_SCALE * rng.normal(size=(2, D_IN, CLASSES))

    def sample(n, mu, rule, shift=0):
        x = rng.normal(size=(n, D_IN)) + mu
        y = np.argmax(x @ rule + rng.gumbel(size=(n, CLASSES)), axis=-1)  # noisy: no separability
        return x, (y + shift) % CLASSES

    parts = [
        sample(SIZES["needed"], mu_a, rule_a),
        sample(SIZES["harmful"], mu_a, rule_a, shift=1),
        sample(SIZES["neutral"], mu_c, rule_c),
    ]
    doms = np.concatenate([np.full(n, j) for j, n in enumerate(SIZES.values())])
    train = batch_of(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    train["domain_ids"] = jnp.asarray(doms, jnp.int32)
    ref = batch_of(*sample(200, mu_a, rule_a))
    ref["domain_ids"] = jnp.zeros(200, jnp.int32)
    return train, ref


def batch_of(x, y):
    return {
        "inputs": jnp.asarray(x, jnp.float32),
        "targets": jnp.asarray(y, jnp.int32),
        "weights": jnp.ones(len(y), jnp.float32),
    }


def mean_loss(params, batch, example_weights=None):
    """Σ c_n ℓ_n / Σ c_n: Eq. 1's inner objective with c_n = 1 + β_(domain of n)."""
    logp = jax.nn.log_softmax(linear_outputs(params, batch, frozenset()))
    nll = -jnp.take_along_axis(logp, batch["targets"][:, None], axis=-1)[:, 0]
    c = batch["weights"] if example_weights is None else example_weights
    return jnp.sum(c * nll) / jnp.sum(c)


def train(train_batch):
    """θ* of the unweighted mixture: Adam to near the optimum, then Newton polishes it."""
    params = {
        "fc0": {
            "kernel": jnp.zeros((D_IN, CLASSES), jnp.float32),
            "bias": jnp.zeros(CLASSES, jnp.float32),
        }
    }
    opt = optax.adam(1e-2)

    def body(carry, _):
        p, s = carry
        g = jax.grad(mean_loss)(p, train_batch)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=300)
    return newton(params, train_batch, jnp.ones(len(train_batch["targets"])))


def _unflatten(v):
    return {
        "fc0": {"kernel": v[: D_IN * CLASSES].reshape(D_IN, CLASSES), "bias": v[D_IN * CLASSES :]}
    }


@jax.jit
def _newton_step(v, batch, c):
    f = lambda u: mean_loss(_unflatten(u), batch, c)
    # 1e-9: the softmax is invariant to a common shift of the logits (D_IN + 1 flat directions,
    # along which the gradient is 0), so H is singular there.
    return v - jnp.linalg.solve(jax.hessian(f)(v) + 1e-9 * jnp.eye(v.size), jax.grad(f)(v))


def newton(params, batch, example_weights, steps=8):
    """Minimises mean_loss(·, c) from a nearby start in float64 (convex: plain Newton converges)."""
    with jax.enable_x64(True):
        layer = params["fc0"]
        v = jnp.concatenate([layer["kernel"].ravel(), layer["bias"]]).astype(jnp.float64)
        batch64 = {**batch, "inputs": batch["inputs"].astype(jnp.float64)}
        c = jnp.asarray(example_weights, jnp.float64)
        for _ in range(steps):
            v = _newton_step(v, batch64, c)
        return jax.tree.map(lambda a: a.astype(jnp.float32), _unflatten(v))


def reference_loss_after(params, train_batch, ref_batch, beta_j):
    """Q(β): the reference loss at θ*(β), re-solved from θ*(0)."""
    c = 1.0 + jnp.asarray(beta_j, jnp.float32)[train_batch["domain_ids"]]
    return float(mean_loss(newton(params, train_batch, c), ref_batch))


@pytest.fixture(scope="module")
def fitted():
    train_batch, ref_batch = make_data()
    params = train(train_batch)
    grad_norm = jnp.linalg.norm(ravel_pytree(jax.grad(mean_loss)(params, train_batch))[0])
    assert float(grad_norm) < 1e-4, "θ* must be a stationary point for Lemma 1 to apply"
    # Ground truth dQ/dβ_j by central differences of the re-solved optimum.
    eps, true_alpha = 0.02, []
    for j in range(len(SIZES)):
        e = np.eye(len(SIZES))[j] * eps
        q_plus = reference_loss_after(params, train_batch, ref_batch, e)
        q_minus = reference_loss_after(params, train_batch, ref_batch, -e)
        true_alpha.append((q_plus - q_minus) / (2 * eps))
    return params, train_batch, ref_batch, np.asarray(true_alpha)


def influence(params, train_batch, ref_batch, operator, damping=0.1):
    """α row "all" per scaling via the library: factors, EK-FAC correction, gradients, inverse."""
    problem = problem_lib.CurvatureProblem(linear_outputs, ("fc0",), token_mask_key=None)
    n = len(train_batch["targets"])
    batches = [jax.tree.map(lambda x, i=i: x[i : i + 100], train_batch) for i in range(0, n, 100)]
    curvature = state = None
    if operator in ("kfac", "ekfac"):
        curvature = kfac_lib.KfacCurvature(problem, "empirical")
        state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(0))
        state = ekfac_lib.fit_eigen_correction(curvature, state, params, batches, jax.random.key(1))
    inverse = operators.build_operator(
        operator,
        problem=problem,
        params=params,
        damping=damping,
        curvature=curvature,
        state=state,
        batches=batches,
        exact_kind="hessian",
        relative_damping=True,
    )
    domain_grads = gradients.group_mean_gradients(problem, params, batches, tuple(SIZES))
    ref_grads = gradients.group_mean_gradients(problem, params, [ref_batch], ("all",))
    return {
        scaling: alpha_lib.compute_alpha(
            ref_grads,
            domain_grads,
            inverse,
            layers=problem.layers,
            scaling=scaling,
            domain_sizes=list(SIZES.values()),
        ).row("all")
        for scaling in ("paper", "exact")
    }


def test_ground_truth_has_the_known_signs(fitted):
    *_, true_alpha = fitted
    assert true_alpha[NEEDED] < 0 < true_alpha[HARMFUL], true_alpha


@pytest.mark.parametrize("operator", ["identity", "kfac", "ekfac", "exact"])
def test_ideal_step_upweights_needed_and_downweights_harmful(fitted, operator):
    params, train_batch, ref_batch, true_alpha = fitted
    cfg = reweight.ReweightConfig.from_config_dict(common.base_config().reweight, step_size=0.15)
    for scaling, alpha_j in influence(params, train_batch, ref_batch, operator).items():
        assert alpha_j[NEEDED] < 0 < alpha_j[HARMFUL], (scaling, alpha_j, true_alpha)
        step = reweight.compute_step(alpha_j, list(SIZES.values()), cfg)
        beta_j = step.beta_nominal
        assert beta_j[HARMFUL] < 0 < beta_j[NEEDED], (scaling, beta_j)
        np.testing.assert_allclose(np.max(np.abs(beta_j)), 0.15, rtol=1e-6)
        assert step.volumes_after.sum() == sum(SIZES.values())  # keep-total
    # The proposed step is a real improvement of the outer objective Q (re-solved, not predicted).
    q0 = float(mean_loss(params, ref_batch))
    assert reference_loss_after(params, train_batch, ref_batch, beta_j) < q0


def test_exact_operator_matches_finite_differences(fitted):
    """Undamped exact Hessian + "exact" scaling is the true derivative dQ/dβ_j (Lemma 1)."""
    params, train_batch, ref_batch, true_alpha = fitted
    alpha_j = influence(params, train_batch, ref_batch, "exact", damping=1e-6)["exact"]
    np.testing.assert_allclose(alpha_j, true_alpha, rtol=0.05, atol=1e-3 * np.abs(true_alpha).max())
