"""The influence stage on a real LM (SmolLM2: a 49,152-token vocabulary, short answers after long
prompts): the loss — its vocabulary-sized softmax and the Fisher's sampled targets — is formed at
the response positions only (problem.add_loss_positions), and examples are batched by length, each
batch padded only to its own longest example (stage.row_plan).

Only tokens with weight enter the loss, so every curvature and gradient quantity is the same as
with all token rows (checked here, exactly, for the deterministic estimators; the Fisher's samples
keep their per-example keys), while the sampled [rows, vocabulary] draws shrink from B·T to B·K
rows (on SmolLM2 with 256-token rows, most of the factor pass's time).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_curvature_models import lm_batches, tiny_lm

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import exact as exact_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.data.formatting import TokenizedExample
from ideal_jax.influence import per_example, stage


def _with_positions(batches, k=None):
    out = []
    for b in batches:
        host = problem_lib.add_loss_positions({key: np.asarray(v) for key, v in b.items()}, k)
        out.append({key: jnp.asarray(v) for key, v in host.items()})
    return out


def _setup(length=12):
    cfg, params = tiny_lm()
    batches = lm_batches(cfg.vocab_size, 2, 4, length)
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    # K = the most weighted tokens of a row (not bucketed: fewer than T, some filler slots)
    k = max(int(np.max(np.sum(np.asarray(b["weights"]) > 0, axis=1))) for b in batches)
    return params, problem, batches, _with_positions(batches, k)


def test_add_loss_positions_lists_each_rows_weighted_tokens():
    weights = np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
    out = problem_lib.add_loss_positions({"weights": weights}, k=4)
    np.testing.assert_array_equal(
        out[problem_lib.LOSS_POSITIONS], [[1, 2, 4, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        out[problem_lib.LOSS_VALID], [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    )
    default = problem_lib.add_loss_positions({"weights": weights})
    assert default[problem_lib.LOSS_POSITIONS].shape == (3, 8)  # a power of two, at least 8
    with pytest.raises(ValueError, match="more than k=2"):
        problem_lib.add_loss_positions({"weights": weights}, k=2)


def test_row_plan_sorts_by_length_and_pads_each_batch_to_its_own_longest():
    lengths = [40, 9, 200, 17, 33, 8, 120, 64]
    responses = [3, 1, 20, 2, 9, 1, 5, 4]
    items = [
        TokenizedExample(np.ones(n, np.int32), np.arange(n) >= n - r, f"e{i}", "d")
        for i, (n, r) in enumerate(zip(lengths, responses))
    ]
    plan = stage.row_plan(items, 3, train_seq_len=128)
    assert [[len(t.input_ids) for t in chunk] for chunk, _, _ in plan] == [
        [8, 9, 17],
        [33, 40, 64],
        [120, 200],
    ]
    # bucketed, capped at the training length, never shorter than an example
    assert [length for _, length, _ in plan] == [32, 64, 200]
    assert [k for _, _, k in plan] == [32, 32, 32]  # one K per pass: the most responses


def test_loss_rows_give_the_same_losses_factors_correction_and_gradients():
    params, problem, batches, positioned = _setup()
    assert positioned[0][problem_lib.LOSS_POSITIONS].shape[1] < batches[0]["weights"].shape[1]
    assert not np.all(positioned[0][problem_lib.LOSS_VALID])
    for plain, rows in zip(batches, positioned):
        np.testing.assert_allclose(
            problem_lib.weighted_loss_sum(problem, params, rows),
            problem_lib.weighted_loss_sum(problem, params, plain),
            rtol=1e-6,
        )
    curvature = kfac_lib.curvature_for(problem, "empirical")
    key = jax.random.key(0)
    states = [
        kfac_lib.accumulate_factors(curvature, params, bs, key) for bs in (batches, positioned)
    ]
    ev = [curvature.kfac_eigenvalues(s) for s in states]
    for path in ev[0]:
        np.testing.assert_allclose(ev[1][path], ev[0][path], rtol=1e-5, atol=1e-7)
    corrections = [
        ekfac_lib.fit_eigen_correction(curvature, s, params, bs, key, chunk_size=2).correction
        for s, bs in zip(states, (batches, positioned))
    ]
    for path in corrections[0]:
        np.testing.assert_allclose(corrections[1][path], corrections[0][path], rtol=1e-4, atol=1e-7)

    selected, _ = layers_lib.split_params(params, problem.layers)
    leaves, treedef = jax.tree.flatten(selected)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    vs = per_example.stack_vectors([v, jax.tree.map(lambda x: -2.0 * x, v)])
    c0, w0, g0 = per_example.contributions_and_gradient(problem, params, batches[0], vs)
    c1, w1, g1 = per_example.contributions_and_gradient(problem, params, positioned[0], vs)
    np.testing.assert_allclose(c1, c0, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(w1, w0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g0)

    ggn = [exact_lib.make_matvec(problem, "ggn", params, bs)(v) for bs in (batches, positioned)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), *ggn)


def test_fisher_correction_with_loss_rows_keeps_per_example_keys():
    """The captured (one backward pass) and per-row (one pass per example) EK-FAC corrections
    still draw each example's targets with the same key when the loss rows are gathered."""
    params, problem, _, positioned = _setup()
    curvature = kfac_lib.curvature_for(problem, "fisher")
    state = kfac_lib.accumulate_factors(curvature, params, positioned, jax.random.key(0))
    fit = lambda impl: (
        ekfac_lib.fit_eigen_correction(
            curvature,
            state,
            params,
            positioned,
            jax.random.key(1),
            chunk_size=2,
            implementation=impl,
        ).correction
    )
    reference, batched = fit("per_row"), fit("captures")
    for path in reference:
        ref = np.asarray(reference[path])
        np.testing.assert_allclose(batched[path], ref, rtol=1e-5, atol=1e-6 * ref.max())


def _random_draw_sizes(jaxpr) -> list[int]:
    """Element counts of every random-bits draw in a (nested) jaxpr."""
    sizes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("random_bits", "threefry2x32"):
            sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    sizes += _random_draw_sizes(inner)
    return sizes


def test_fisher_draws_targets_for_response_rows_only():
    """The factor pass and the EK-FAC correction sample [B·K, V] targets, not [B·T, V]: on
    SmolLM2 (V = 49,152, T = 256, a few answer tokens per row) the draws over every prompt and
    padding row were most of the factor pass's time."""
    params, problem, batches, positioned = _setup(length=24)
    b, t = batches[0]["weights"].shape
    k = positioned[0][problem_lib.LOSS_POSITIONS].shape[1]
    vocab = 32  # tiny_lm's
    assert k < t
    curvature = kfac_lib.curvature_for(problem, "fisher")
    key = jax.random.key(0)
    state = curvature.init(params, positioned[0], key)
    update = jax.make_jaxpr(curvature._update_impl)(state, params, positioned[0], key)
    draws = _random_draw_sizes(update.jaxpr)
    assert draws and max(draws) <= b * k * vocab, (draws, b * t * vocab)
    bases = curvature.eigenbases(kfac_lib.accumulate_factors(curvature, params, positioned, key))
    acc = {p: jnp.zeros((qa.shape[0], qg.shape[0])) for p, (qa, _, qg, _) in bases.items()}
    step = lambda a, w, p, bt, bs, r: ekfac_lib._captured_correction_step(
        curvature, "example", 2, a, w, p, bt, bs, r
    )
    correction = jax.make_jaxpr(step)(acc, jnp.zeros(()), params, positioned[0], bases, key)
    draws = _random_draw_sizes(correction.jaxpr)
    assert draws and max(draws) <= b * k * vocab, (draws, b * t * vocab)


def test_batched_ggn_products_and_cg_match_one_vector_at_a_time():
    """The exact reference on a real model (real_model_alpha_accuracy.py): CG for all reference
    rows at once, the model's forward pass once per batch and step for all vectors."""
    from jax.flatten_util import ravel_pytree

    params, problem, _, positioned = _setup()
    selected, _ = layers_lib.split_params(params, problem.layers)
    leaves, treedef = jax.tree.flatten(selected)
    vectors = []
    for seed in (5, 6):
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        normal = [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
        vectors.append(jax.tree.unflatten(treedef, normal))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *vectors)
    single = exact_lib.make_matvec(problem, "ggn", params, positioned)
    many = exact_lib.make_matvec_many(problem, "ggn", params, positioned)(stacked)
    for i, v in enumerate(vectors):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
            jax.tree.map(lambda x, i=i: x[i], many),
            single(v),
        )
    lam_p = jnp.full(ravel_pytree(selected)[0].shape, 1e-2)
    xs, info = exact_lib.conjugate_gradient_many(
        exact_lib.make_matvec_many(problem, "ggn", params, positioned), stacked, lam_p, tol=1e-6
    )
    assert 0 < info["iterations"] <= 200 and max(info["relative_residual"]) <= 1e-6
    for i, v in enumerate(vectors):
        one = exact_lib.conjugate_gradient(single, v, lam_p, tol=1e-6)
        got = jax.tree.map(lambda x, i=i: x[i], xs)
        np.testing.assert_allclose(ravel_pytree(got)[0], ravel_pytree(one)[0], rtol=1e-3, atol=1e-5)
