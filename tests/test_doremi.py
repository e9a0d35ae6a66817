"""DoReMi (ideal_jax/compare/doremi.py): the weight update against numpy, one step against the
objective written out, a known ranking on synthetic domains, resume, bad settings."""

import functools
import json
import math
import os
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import tiny
from ideal_jax import sharding
from ideal_jax.compare import doremi, doremi_proxy
from ideal_jax.data import formatting, mixture
from ideal_jax.data import suite as suite_lib
from ideal_jax.model.config import preset
from ideal_jax.model.transformer import init_params
from ideal_jax.train.step import weighted_token_losses
from ideal_jax.utils.errors import InputError

VOCAB = 32
# Two learnable domains under the same prompt format; only the responses differ.
RESPONSES = {"seen": [4, 5, 6, 7, 8], "unseen": [20, 21, 22, 23, 24]}
PROMPTS = {"seen": [1, 2, 9], "unseen": [1, 3, 9]}
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compile time only, as test_train_loop
FAST = {"compiler_options": FAST_COMPILE}


def _config(**compare) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(tiny.get_config().to_dict())
    cfg.progress = False
    cfg.train.batch_size = 8
    cfg.train.seq_len = 32
    cfg.train.epochs = 4
    cfg.train.learning_rate = 3e-3
    cfg.train.warmup_steps = 2
    cfg.train.log_every = 2
    # the other cfg.compare fields: configs/common.py's (a bad value's type too: not type-checked)
    cfg.compare = ml_collections.ConfigDict({**cfg.compare.to_dict(), **compare})
    return cfg


def _suite(names=("seen", "unseen"), per_domain: int = 24) -> suite_lib.Suite:
    tokenized = {}
    for name in names:
        prompt, response = PROMPTS[name], RESPONSES[name]
        ids = np.asarray(prompt + response, np.int32)
        mask = np.asarray([False] * len(prompt) + [True] * len(response))
        tokenized[name] = [
            formatting.TokenizedExample(ids, mask, f"{name}-{i}", name) for i in range(per_domain)
        ]
    return suite_lib.Suite(
        domains={name: [] for name in names},
        reference={},
        tokenizer=types.SimpleNamespace(pad_token_id=0),
        tokenized=tokenized,
        reference_tokenized=[],
        format_stats={},
        eval_tasks={},
    )


def _uniform(suite: suite_lib.Suite) -> mixture.Mixture:
    ids = {n: [t.example_id for t in items] for n, items in suite.tokenized.items()}
    return mixture.build_mixture(ids, None, seed=0)


@functools.cache
def _setup():
    model_cfg = preset("tiny", vocab_size=VOCAB)
    init = jax.jit(functools.partial(init_params, model_cfg), compiler_options=FAST_COMPILE)
    params = jax.device_get(init(jax.random.key(0)))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return model_cfg, params, mesh


@pytest.fixture(scope="module")
def known_run(tmp_path_factory):
    """A reference trained on the "seen" domain only; DoReMi on the uniform mixture of both.

    The proxy starts from the initial parameters, so on "seen" it is far behind the reference
    (large excess), while on "unseen" the reference confidently predicts "seen"'s responses and
    is worse than the proxy (excess clipped to 0): DoReMi must put its weight on "seen".
    """
    model_cfg, params, mesh = _setup()
    cfg, suite = _config(), _suite()
    cfg.train.log_every = 1  # the whole trajectory, so that its mean can be checked
    reference = _train_reference(model_cfg, params, cfg, _suite(names=("seen",)), epochs=10)
    workdir = str(tmp_path_factory.mktemp("doremi"))
    with pytest.MonkeyPatch.context() as patch:
        # One trace of the step for the whole run.
        patch.setattr(
            doremi_proxy, "doremi_step", chex.assert_max_traces(doremi_proxy.doremi_step, n=1)
        )
        result = doremi.doremi_weights(
            cfg,
            model_cfg,
            mesh,
            suite,
            _uniform(suite),
            params,
            reference,
            workdir,
            compiler_options=FAST_COMPILE,
        )
    return dict(cfg=cfg, suite=suite, reference=reference, workdir=workdir, result=result)


def _train_reference(model_cfg, params, cfg, suite, epochs):
    """Plain Adam on the mean response-token loss of `suite` (independent of the code tested)."""
    optimizer = optax.adam(1e-2)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def update(p, opt_state, batch):
        def mean_loss(p):
            return jnp.sum(weighted_token_losses(model_cfg, p, batch)) / jnp.sum(batch["weights"])

        updates, opt_state = optimizer.update(jax.grad(mean_loss)(p), opt_state, p)
        return optax.apply_updates(p, updates), opt_state

    batches, steps = suite_lib.mixture_batches(suite, _uniform(suite), cfg.train, cfg.data, 0)
    opt_state = optimizer.init(params)
    for epoch in range(epochs):
        for batch in list(batches(epoch))[:steps]:
            params, opt_state = update(params, opt_state, batch)
    return jax.device_get(params)


def _numpy_excess(proxy, ref, weights, domains, k):
    excess, present = np.zeros(k), np.zeros(k, bool)
    for j in range(k):
        on = (domains == j) & (weights > 0)
        present[j] = on.any()
        if present[j]:
            excess[j] = np.maximum(proxy[on] - ref[on], 0).sum() / weights[on].sum()
    return excess, present


def _numpy_update(alpha, excess, present, eta, c):
    logits = np.log(alpha) + eta * np.where(present, excess, 0.0)
    new = np.exp(logits - logits.max())
    new /= new.sum()
    return (1 - c) * new + c / len(alpha)


def test_weight_update_matches_numpy():
    """Two steps on hand-made token losses: per-token clipped excess, absent domain, smoothing."""
    eta, c, k = 0.7, 0.1, 3
    weights = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.float32)
    steps = [
        (
            np.array([[9, 2.0, 0.5, 3.0, 0], [1.5, 2.5, 0.2, 4.0, 1.0]], np.float32),
            np.array([[0, 1.0, 1.5, 1.0, 0], [1.0, 0.5, 0.9, 1.0, 3.0]], np.float32),
            np.array([[-1, 0, 0, 1, -1], [2, 2, 1, 1, 0]], np.int32),
        ),
        (  # domain 2 absent: λ_2 = 0 even if excess_j held garbage there
            np.array([[5, 1.0, 3.0, 0.5, 7], [2.0, 2.0, 0.1, 1.0, 1.0]], np.float32),
            np.array([[0, 2.0, 1.0, 0.2, 0], [0.5, 1.0, 3.0, 1.0, 4.0]], np.float32),
            np.array([[-1, 0, 0, 1, -1], [1, 1, 0, 0, -1]], np.int32),
        ),
    ]
    log_alpha = jnp.full((k,), -math.log(k))
    expected = np.full(k, 1 / k)
    for proxy, ref, domains in steps:
        w = np.where(domains >= 0, weights, 0).astype(np.float32)
        stats = doremi_proxy.domain_statistics(proxy * w, ref * w, w, domains, k)
        present = stats["tokens"] > 0
        excess = jnp.where(present, stats["excess_sums"] / jnp.maximum(stats["tokens"], 1), 99.0)
        log_alpha, alpha = doremi_proxy.update_domain_weights(log_alpha, excess, present, eta, c)
        want_excess, want_present = _numpy_excess(proxy * w, ref * w, w, domains, k)
        np.testing.assert_array_equal(np.asarray(present), want_present)
        expected = _numpy_update(expected, want_excess, want_present, eta, c)
        np.testing.assert_allclose(np.asarray(alpha), expected, rtol=1e-6)
        np.testing.assert_allclose(np.exp(np.asarray(log_alpha)), expected, rtol=1e-6)
    assert not want_present[2] and expected.sum() == pytest.approx(1.0)


ETA, SMOOTHING, DOMAINS = 1.3, 0.05, 3  # the third domain never occurs in the batch


@functools.cache
def _written_out_step():
    """The batch, a reference, and what one step must give: λ, α and the SGD(1) parameters."""
    model_cfg, params, _ = _setup()
    cfg, suite = _config(), _suite()
    batches, _ = suite_lib.mixture_batches(suite, _uniform(suite), cfg.train, cfg.data, 0)
    batch = {k: jnp.asarray(v) for k, v in next(iter(batches(0))).items()}
    noise = jax.tree.map(lambda p: np.random.default_rng(p.size).normal(size=p.shape), params)
    reference = jax.tree.map(lambda p, n: (p + 0.05 * n).astype(np.float32), params, noise)
    losses = jax.jit(functools.partial(weighted_token_losses, model_cfg), **FAST)
    proxy_bt, ref_bt = np.asarray(losses(params, batch)), np.asarray(losses(reference, batch))
    w, domains = np.asarray(batch["weights"]), np.asarray(batch["domain_ids"])
    assert (proxy_bt > ref_bt).any() and (proxy_bt < ref_bt).any()  # clipping matters
    excess, present = _numpy_excess(proxy_bt, ref_bt, w, domains, DOMAINS)
    assert present.tolist() == [True, True, False]
    alpha = _numpy_update(np.full(DOMAINS, 1 / DOMAINS), excess, present, ETA, SMOOTHING)

    def objective(p):  # Σ_i α_i · mean token loss of domain i over the present domains
        losses_bt = weighted_token_losses(model_cfg, p, batch)
        return sum(
            alpha[j] * jnp.sum(jnp.where(domains == j, losses_bt, 0)) / w[domains == j].sum()
            for j in range(DOMAINS)
            if present[j]
        )

    value, grads = jax.jit(jax.value_and_grad(objective), **FAST)(params)
    want_params = jax.tree.map(lambda p, g: p - g, params, grads)
    return batch, reference, excess, alpha, float(value), want_params


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_step_matches_written_out_objective(grad_accum):
    """One jitted step = the paper's update written out: λ, α, then a gradient step on
    Σ_i α_i · mean loss_i (plain SGD with rate 1, so the update is minus that gradient;
    grad_accum 2 gives the same update)."""
    model_cfg, params, mesh = _setup()
    batch, reference, excess, alpha, value, want_params = _written_out_step()
    optimizer = optax.sgd(1.0)
    step = doremi_proxy.make_doremi_step(
        model_cfg,
        optimizer,
        doremi_proxy.doremi_shardings(model_cfg, optimizer, mesh),
        mesh,
        num_domains=DOMAINS,
        eta=ETA,
        smoothing=SMOOTHING,
        grad_accum=grad_accum,
        compiler_options=FAST_COMPILE,
    )
    state, metrics = step(
        doremi_proxy.init_doremi_state(params, optimizer, DOMAINS), batch, reference
    )
    np.testing.assert_allclose(np.asarray(metrics["excess_j"]), excess, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["alpha_j"]), alpha, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.alpha_sum_j), alpha, rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(state.log_alpha_j)), alpha, rtol=1e-5)
    assert float(metrics["loss"]) == pytest.approx(value, rel=1e-5)
    chex.assert_trees_all_close(state.params, want_params, atol=1e-7, rtol=1e-5)


def test_learnable_gap_is_upweighted(known_run):
    """Known answer: "unseen"'s clipped excess is exactly 0 at every step, "seen"'s is positive,
    so "seen" takes nearly all the weight from the first step on and "unseen" sinks to the
    smoothing floor c / 2 (the smoothed weights are carried from step to step, as in the paper)."""
    result, cfg, suite = known_run["result"], known_run["cfg"], known_run["suite"]
    assert result["domains"] == ["seen", "unseen"]
    assert [row[1] for row in result["excess_trajectory"]] == [0.0] * len(result["trajectory"])
    assert min(row[0] for row in result["excess_trajectory"]) > 0.1
    seen = [row[0] for row in result["trajectory"]]
    assert seen[0] > 0.9 and min(seen[1:]) > 0.99, seen
    weights = result["weights"]
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
    assert weights["seen"] > 0.95, weights
    assert result["eta"] == 1.0 and result["smoothing"] == 1e-3  # configs/common.py's defaults
    floor = result["smoothing"] / 2
    assert floor * (1 - 1e-5) <= result["final_weights"]["unseen"] < 3 * floor
    _, steps_per_epoch = suite_lib.mixture_batches(suite, _uniform(suite), cfg.train, cfg.data, 0)
    steps = result["steps"]
    assert steps == cfg.train.epochs * steps_per_epoch
    assert result["trajectory_steps"] == list(range(1, steps + 1))
    mean = np.mean(result["trajectory"], axis=0)  # DoReMi's answer: the average over all steps
    np.testing.assert_allclose([weights["seen"], weights["unseen"]], mean, rtol=1e-5)
    assert result["final_weights"] == dict(zip(result["domains"], result["trajectory"][-1]))


def test_resume_returns_the_file_without_training(known_run, monkeypatch):
    workdir, suite = known_run["workdir"], known_run["suite"]
    model_cfg, params, mesh = _setup()
    path = os.path.join(workdir, "doremi.json")
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(known_run["result"]))

    def no_training(*args, **kwargs):
        raise AssertionError("resumed DoReMi must not train")

    monkeypatch.setattr(suite_lib, "mixture_batches", no_training)
    monkeypatch.setattr(doremi_proxy, "make_doremi_step", no_training)
    args = (model_cfg, mesh, suite, _uniform(suite), params, known_run["reference"], workdir)
    assert doremi.doremi_weights(known_run["cfg"], *args) == on_disk
    # The defaults written out again are the same inputs.
    same = _config(doremi_eta=1.0, doremi_smoothing=1e-3)
    assert doremi.doremi_weights(same, *args) == on_disk
    mtime = os.path.getmtime(path)
    with pytest.raises(InputError) as err:  # other settings: stop, overwrite nothing
        doremi.doremi_weights(_config(doremi_eta=2.0), *args)
    assert err.value.field == "config" and err.value.path == path
    assert os.path.getmtime(path) == mtime


@pytest.mark.parametrize(
    "field, value",
    [
        ("doremi_eta", 0.0),
        ("doremi_eta", -1.0),
        ("doremi_eta", float("nan")),
        ("doremi_eta", float("inf")),
        ("doremi_eta", "1"),
        ("doremi_smoothing", -0.1),
        ("doremi_smoothing", 1.0),
        ("doremi_smoothing", float("nan")),
    ],
)
def test_bad_settings_name_the_field(tmp_path, field, value):
    model_cfg, params, mesh = _setup()
    suite = _suite()
    with pytest.raises(InputError) as err:
        doremi.doremi_weights(
            _config(**{field: value}),
            model_cfg,
            mesh,
            suite,
            _uniform(suite),
            params,
            params,
            str(tmp_path),
        )
    assert err.value.field == f"compare.{field}"
    assert not os.listdir(tmp_path)
