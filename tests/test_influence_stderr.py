"""Error bars on α: the fused gradient pass's per-example terms reproduce α and its gradients, and
the delta-method standard errors agree with a bootstrap over the sampled examples."""

import jax
import numpy as np
import pytest
from test_influence_per_example import _batch

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params


def test_fused_pass_gives_domain_gradients_and_alpha_terms():
    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    params = jax.tree.map(lambda x: 3 * x, init_params(cfg, jax.random.key(0)))
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    rng = np.random.default_rng(0)
    train = [(g, _batch(rng, 4, 12, 40, g)) for g in (0, 1, 1)]
    refs = [(c, _batch(rng, 4, 12, 40, c)) for c in (0, 1)]
    ref = gradients.single_group_mean_gradients(problem, params, refs, ["c0", "c1"])
    plain = gradients.single_group_mean_gradients(problem, params, train, ["a", "b"])
    op = operators.build_operator("identity", problem=problem, params=params)
    vs = [op(g) for _, g in alpha_lib.reference_rows(ref)]
    fused, terms = gradients.single_group_gradients_and_contributions(
        problem, params, train, ["a", "b"], vs
    )
    for a, b in zip(jax.tree.leaves(fused.grads), jax.tree.leaves(plain.grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fused.weights, plain.weights)
    alpha = alpha_lib.compute_alpha(ref, plain, op, layers=problem.layers, inverse_vectors=vs)
    assert terms.c.shape == (12, 3) and list(np.bincount(terms.group)) == [4, 8]
    for j in (0, 1):  # α_rj = Σ_{n∈j} c_nr / Σ_{n∈j} w_n
        m = terms.group == j
        np.testing.assert_allclose(
            terms.c[m].sum(0) / terms.w[m].sum(), alpha.matrix[:, j], rtol=1e-4
        )
    se = alpha_lib.standard_errors(terms.c, terms.w, terms.group, 2)
    assert se.shape == alpha.matrix.shape and np.all(se > 0)
    assert "stderr" in alpha_lib.InfluenceResult(**{**alpha.__dict__, "stderr": se}).to_json()


@pytest.mark.parametrize("scaling", ["paper", "exact"])
def test_standard_errors_match_a_bootstrap(scaling):
    rng = np.random.default_rng(1)
    n_j = [60, 90, 40]
    group = np.concatenate([np.full(n, j) for j, n in enumerate(n_j)])
    w = rng.integers(5, 40, len(group)).astype(float)
    c = (rng.normal(size=(len(group), 2)) + np.asarray([3.0, -5.0, 8.0])[group, None]) * w[:, None]
    sizes = np.asarray([1000.0, 3000.0, 500.0])

    def alpha(c, w, group):
        m = np.stack([c[group == j].sum(0) / w[group == j].sum() for j in range(3)], axis=1)
        if scaling == "paper":
            return m
        f = sizes / sizes.sum()
        return -f[None] * (m - (m * f[None]).sum(1, keepdims=True))

    draws = []
    for _ in range(2000):  # resample each domain's examples independently
        idx = np.concatenate([rng.choice(np.flatnonzero(group == j), n_j[j]) for j in range(3)])
        draws.append(alpha(c[idx], w[idx], group[idx]))
    boot = np.std(draws, axis=0)
    se = alpha_lib.standard_errors(c, w, group, 3, scaling=scaling, domain_sizes=sizes)
    np.testing.assert_allclose(se, boot, rtol=0.12)
    one = alpha_lib.standard_errors(c[:61], w[:61], group[:61], 3)
    assert np.isnan(one[:, 1]).all() and np.isnan(one[:, 2]).all()  # one example: no error bar


def test_scores_of_a_biased_mlp_equal_per_row_gradients():
    """One backward pass per batch gives −v · ∇ℓ̄_n of each row, bias entries included."""
    from test_curvature_models import classification_batches, mlp_params, mlp_problem

    from ideal_jax.curvature.problem import weighted_loss_sum
    from ideal_jax.influence import per_example

    sizes = (5, 7, 3)
    params = mlp_params(sizes)
    problem = mlp_problem(params)
    batch = classification_batches(sizes, 1, 6)[0]
    rng = np.random.default_rng(4)
    v = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    scores = per_example.per_example_scores(problem, params, [batch], [v])
    loss = lambda p, row: weighted_loss_sum(problem, p, row)
    for n in range(6):
        row = {k: x[n : n + 1] for k, x in batch.items()}
        grad, w = jax.grad(loss, has_aux=True)(params, row)
        dot = sum(np.vdot(g, x) for g, x in zip(jax.tree.leaves(grad), jax.tree.leaves(v)))
        np.testing.assert_allclose(scores[n, 0], -dot / float(w), rtol=1e-4)
