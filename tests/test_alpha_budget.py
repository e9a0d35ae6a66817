"""The default subsample budget, set by α's own standard errors (influence/stage.py alpha_se):
α from the per-example terms equals α from the gradients; the stages double the unresolved
domains only, stop when resolved / capped / whole, and take prefixes of one draw order; staged
accumulation gives exactly the α of one pass over the final examples."""

import dataclasses
from collections import Counter
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest
from config_helpers import tiny_config
from test_influence_per_example import _batch

from configs.common import base_config
from ideal_jax import sharding
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.data import mixture as mx
from ideal_jax.data import suite as suite_lib
from ideal_jax.data.formatting import TokenizedExample
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients, stage
from ideal_jax.model import loading
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params
from ideal_jax.utils.errors import InputError


@pytest.mark.parametrize("scaling", ["paper", "exact"])
def test_alpha_from_terms_equals_alpha_from_gradients(scaling):
    cfg = ModelConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=1,
        num_heads=2, num_kv_heads=1, head_dim=8,
    )  # fmt: skip
    params = jax.tree.map(lambda x: 3 * x, init_params(cfg, jax.random.key(0)))
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    rng = np.random.default_rng(0)
    train = [(g, _batch(rng, 4, 12, 40, g)) for g in (0, 1, 1, 2)]
    refs = [(c, _batch(rng, 4, 12, 40, c)) for c in (0, 1)]
    ref = gradients.single_group_mean_gradients(problem, params, refs, ["c0", "c1"])
    op = operators.build_operator("identity", problem=problem, params=params)
    vs = [op(g) for _, g in alpha_lib.reference_rows(ref)]
    grads, terms = gradients.single_group_gradients_and_contributions(
        problem, params, train, ["a", "b", "c"], vs
    )
    sizes = [300.0, 500.0, 200.0]
    alpha = alpha_lib.compute_alpha(
        ref, grads, op, layers=problem.layers, scaling=scaling, domain_sizes=sizes,
        inverse_vectors=vs,
    )  # fmt: skip
    got = alpha_lib.alpha_from_terms(
        terms.c, terms.w, terms.group, 3, scaling=scaling, domain_sizes=sizes
    )
    np.testing.assert_allclose(got, alpha.matrix, rtol=2e-4, atol=1e-7 * np.abs(alpha.matrix).max())


def _plan(first, cap, available, target=0.2):
    by_domain = tuple(list(range(n)) for n in available)
    return stage.SubsamplePlan([], by_domain, tuple(first), tuple(cap), target, {})


def _scripted(noise_of):
    """add_stage for grow_domain_terms: domain j's examples have term c = mean_j + noise_j·ε
    (weights 1), so α_j ≈ mean_j and its s.e. ≈ noise_j / √n_j."""
    means = np.array([1.0, -1.0, 0.5])
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((3, 4096))
    eps = (eps - eps.mean(1, keepdims=True)) / eps.std(1, keepdims=True)
    calls = []

    def add_stage(ranges):
        calls.append(ranges)
        have = [end for _, end in ranges]
        c = np.concatenate([means[j] + noise_of[j] * eps[j, :n] for j, n in enumerate(have)])
        group = np.concatenate([np.full(n, j) for j, n in enumerate(have)])
        return gradients.ExampleContributions(c[:, None], np.ones(len(c)), group)

    return add_stage, calls


def test_stages_double_only_the_unresolved_domains_and_stop_when_resolved():
    # rms α ≈ 0.866, target 0.2 → s.e. must be ≤ 0.173: noise 0.5 needs n ≥ 9, noise 4 n ≥ 534
    add_stage, calls = _scripted([0.5, 4.0, 0.5])
    out = stage.grow_domain_terms(
        _plan([16, 16, 16], [4096] * 3, [4096] * 3), add_stage, ("a", "b", "c"), "paper", None
    )
    assert out.stopped == "resolved"
    assert out.sizes == (16, 1024, 16)
    # each stage adds only the new examples of the domains that grow (prefixes of one order)
    assert calls[0] == ((0, 16), (0, 16), (0, 16))
    assert calls[1] == ((16, 16), (16, 32), (16, 16))
    assert [c[1] for c in calls] == [(0, 16), (16, 32), (32, 64), (64, 128), (128, 256),
                                     (256, 512), (512, 1024)]  # fmt: skip
    assert len(out.log) == len(calls) and out.log[-1]["examples"]["b"] == 1024
    assert all(v <= 0.2 for v in out.log[-1]["se_over_rms_alpha"].values())


def test_stages_stop_at_the_cap_or_when_a_domain_is_used_whole():
    add_stage, _ = _scripted([0.5, 4.0, 0.5])
    capped = stage.grow_domain_terms(
        _plan([16] * 3, [100] * 3, [4096] * 3), add_stage, ("a", "b", "c"), "paper", None
    )
    assert capped.stopped == "cap" and capped.sizes == (16, 100, 16)
    add_stage, _ = _scripted([0.5, 4.0, 0.5])
    whole = stage.grow_domain_terms(
        _plan([16] * 3, [300, 300, 300], [300, 300, 300]), add_stage, ("a", "b", "c"), "paper",
        None,
    )  # fmt: skip
    assert whole.stopped == "whole" and whole.sizes == (16, 300, 16)
    add_stage, calls = _scripted([0.5, 4.0, 0.5])
    once = stage.grow_domain_terms(
        _plan([16] * 3, [4096] * 3, [4096] * 3, target=None), add_stage, ("a", "b", "c"),
        "paper", None,
    )  # fmt: skip
    assert once.stopped == "one stage" and len(calls) == 1 and once.sizes == (16, 16, 16)


def _suite(sizes):
    ids = {d: [f"{d}{i}" for i in range(n)] for d, n in sizes.items()}
    tok = lambda d, i: TokenizedExample(np.ones(4, np.int32), np.ones(4, bool), i, d)
    return ids, SimpleNamespace(tokenized={d: [tok(d, i) for i in v] for d, v in ids.items()})


def _curv(**kw):
    base = {"subsample": "alpha_se", "examples_per_domain": 8, "max_examples_per_domain": 50,
            "alpha_se_target": 0.2, "sigma": 0.5,
            "allocation": base_config().curvature.allocation}  # fmt: skip
    return ml_collections.ConfigDict({**base, **kw})


def test_proportional_counts_by_hand():
    assert stage.proportional_counts([60, 400], 16) == [2, 14]  # 2.09, 13.91: b's remainder
    assert stage.proportional_counts([1, 1, 1], 2) == [1, 1, 0]  # ties go to the earlier group
    assert stage.proportional_counts([3, 5], 100) == [3, 5]  # never more than a group holds
    assert stage.proportional_counts([0, 4], 2) == [0, 2]
    assert stage.proportional_counts([0, 0], 2) == [0, 0]


def test_plan_draws_one_order_per_domain_and_the_curvature_sample_is_its_prefix():
    ids, suite = _suite({"a": 30, "b": 400})
    mix = mx.build_mixture(ids, {"a": 1.0, "b": 0.0}, seed=0)  # a: every example twice
    plan = stage.plan_subsample(suite, mix, _curv(), seed=3)
    assert plan.first == (8, 8) and plan.cap == (50, 50) and plan.target == 0.2
    assert [len(b) for b in plan.by_domain] == [60, 400]  # every entry, repeats included
    # By default the curvature passes read as many entries as 8 per domain would (16), split in
    # proportion to the mixture's entries (60 : 400): the mixture's own Hessian.
    assert Counter(t.domain for t in plan.curvature_items) == {"a": 2, "b": 14}
    assert plan.curvature_items == plan.by_domain[0][:2] + plan.by_domain[1][:14]
    assert plan.info["curvature_examples"] == {"a": 2, "b": 14}
    equal = stage.plan_subsample(suite, mix, _curv(allocation="per_domain"), seed=3)
    assert equal.curvature_items == plan.by_domain[0][:8] + plan.by_domain[1][:8]
    assert equal.by_domain == plan.by_domain and equal.first == plan.first
    with pytest.raises(InputError, match="curvature.allocation"):
        stage.plan_subsample(suite, mix, _curv(allocation="equal"), 3)
    # a larger budget extends the smaller one's sample (same seed, same order)
    assert stage.plan_subsample(suite, mix, _curv(examples_per_domain=16), 3).by_domain == (
        plan.by_domain
    )
    # the cost is flat in the data: ten times the data, the same first stage and cap
    ids10, suite10 = _suite({"a": 300, "b": 4000})
    plan10 = stage.plan_subsample(suite10, mx.build_mixture(ids10, None, seed=0), _curv(), 3)
    assert plan10.first == (8, 8) and plan10.cap == (50, 50)
    # 0 is σ whatever the mode (configs from before the mode); fixed is one stage
    assert stage.plan_subsample(suite, mix, _curv(examples_per_domain=0), 3).info == {"sigma": 0.5}
    fixed = stage.plan_subsample(suite, mix, _curv(subsample="fixed"), 3)
    assert fixed.target is None and fixed.first == fixed.cap == (8, 8)
    assert Counter(t.domain for t in fixed.curvature_items) == {"a": 2, "b": 14}
    same = stage.plan_subsample(suite, mix, _curv(subsample="fixed", allocation="per_domain"), 3)
    every = sorted(t.example_id for b in same.by_domain for t in b)  # every pass, as before
    assert sorted(t.example_id for t in same.curvature_items) == every
    with pytest.raises(InputError, match="max_examples_per_domain"):
        stage.plan_subsample(suite, mix, _curv(max_examples_per_domain=4), 3)
    with pytest.raises(InputError, match="curvature.subsample"):
        stage.plan_subsample(suite, mix, _curv(subsample="all"), 3)


@pytest.mark.integration
def test_staged_alpha_equals_one_pass_over_the_final_examples(tmp_path, monkeypatch):
    cfg = tiny_config(
        **{
            "curvature.layers": r"layers\.1\.mlp\.(gate|up|down)_proj",
            "curvature.subsample": "alpha_se",
            "curvature.examples_per_domain": 4,
            "curvature.max_examples_per_domain": 64,
            "curvature.alpha_se_target": 0.05,
            "influence.operator": "ekfac",
        }
    )
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, str(tmp_path))
    model_cfg, params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=0)
    ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
    mix = mx.build_mixture(ids, None, seed=0, keep_total=True)
    run = lambda: stage.influence_for_round(
        cfg.curvature, cfg.influence, model_cfg, params, suite, mix, mesh,
        seed=0, train_seq_len=cfg.train.seq_len,
    )  # fmt: skip
    staged = run()
    info = staged.subsample
    assert len(info["stages"]) >= 2, info  # the budget grew at least once
    sizes = tuple(info["examples"][n] for n in suite.domain_names)
    assert sum(sizes) == staged.subsample_examples
    planned = stage.plan_subsample

    def one_stage(*a, **k):  # the same examples, read in one pass, no budget
        return dataclasses.replace(planned(*a, **k), first=sizes, target=None)

    monkeypatch.setattr(stage, "plan_subsample", one_stage)
    once = run()
    scale = np.abs(once.alpha.matrix).max()
    np.testing.assert_allclose(staged.alpha.matrix, once.alpha.matrix, rtol=1e-4, atol=1e-6 * scale)
    np.testing.assert_allclose(staged.alpha.stderr, once.alpha.stderr, rtol=1e-4)
