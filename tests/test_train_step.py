"""train_step: sharded == single-device, traces once, accumulation == big batch, per-domain sums."""

import functools

import chex
import jax
import ml_collections
import numpy as np
import pytest

from ideal_jax import sharding
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import abstract_params, forward, init_params, token_losses
from ideal_jax.train import state as train_state
from ideal_jax.train import step as train_step_lib

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
)
NUM_DOMAINS = 3
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mixed": (2, 2, 2)}


def train_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        learning_rate=1e-3,
        warmup_steps=2,
        schedule="cosine",
        end_lr_fraction=0.1,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        grad_accum=1,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def synthetic_batch(seed: int, rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """Two packed examples per row (prompt then response), then padding; random domains."""
    rng = np.random.default_rng(seed)
    batch = {
        "tokens": rng.integers(0, CFG.vocab_size, (rows, seq_len)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (rows, seq_len)).astype(np.int32),
        "weights": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
        "domain_ids": np.full((rows, seq_len), -1, np.int32),
    }
    for r in range(rows):
        start = 0
        for segment in (1, 2):
            length = int(rng.integers(3, seq_len // 2))
            prompt = int(rng.integers(1, length))
            span = slice(start, start + length)
            batch["segment_ids"][r, span] = segment
            batch["positions"][r, span] = np.arange(length)
            batch["domain_ids"][r, span] = rng.integers(0, NUM_DOMAINS)
            batch["weights"][r, start + prompt : start + length] = 1.0
            start += length
    return batch


# Compile faster on CPU; both sides of every comparison use the same options.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _mesh(name: str):
    if name == "single":
        return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return sharding.make_mesh(MESHES[name])


@functools.cache
def _host_params():
    return jax.device_get(init_params(CFG, jax.random.key(0)))


@functools.cache
def _compiled_step(mesh_name: str, grad_accum: int):
    """(jitted step, optimizer, shardings, host initial state) per mesh; reused across tests, so
    assert_max_traces(n=1) proves one trace for every batch fed to it in this module."""
    mesh = _mesh(mesh_name)
    optimizer = train_state.make_optimizer(train_config(grad_accum=grad_accum), total_steps=10)
    # Reshard one host copy of the parameters (the "existing params" path of init_train_state):
    # a random init per mesh would cost a compile each.
    state, shardings = train_state.init_train_state(CFG, optimizer, mesh, _host_params())

    def bound(state, batch):
        return train_step_lib.train_step(
            state,
            batch,
            model_cfg=CFG,
            optimizer=optimizer,
            num_domains=NUM_DOMAINS,
            grad_accum=grad_accum,
            mesh=mesh if grad_accum > 1 else None,
        )

    chex.clear_trace_counter()  # the counter is keyed by call site, shared by every mesh here
    step_fn = train_step_lib.jit_train_step(
        chex.assert_max_traces(bound, n=1), shardings, mesh, compiler_options=FAST_COMPILE
    )
    return step_fn, shardings, jax.device_get(state), mesh


def _run_steps(mesh_name, batches, *, grad_accum=1):
    step_fn, shardings, host_state, mesh = _compiled_step(mesh_name, grad_accum)
    state = jax.device_put(host_state, shardings)
    history = []
    for batch in batches:
        state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


@functools.lru_cache(maxsize=1)
def _single_device_reference():
    batches = [synthetic_batch(i, 16, 16) for i in range(5)]
    return batches, _run_steps("single", batches)


@pytest.mark.parametrize(
    "name",
    # fsdp-only and tensor-only are covered by "mixed" (2, 2, 2) in the default suite.
    ["data", "mixed"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("fsdp", "tensor")],
)
def test_sharded_training_matches_single_device(name):
    """5 f32 updates at lr 1e-3: losses within rtol 1e-5 and params within rtol 1e-4 / atol 1e-6
    of single-device training (Adam turns summation-order noise in near-zero gradients into
    differences of order lr * 1e-3)."""
    batches, (ref_state, ref_history) = _single_device_reference()
    state, history = _run_steps(name, batches)
    for got, want in zip(history, ref_history):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["domain_loss_sums"], want["domain_loss_sums"], rtol=1e-5)
        assert got["is_finite"]
    assert int(state.step) == 5
    chex.assert_trees_all_close(state.params, ref_state.params, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_big_batch():
    """k=2 microbatches scanned inside the step == one 16-row batch (loss, metrics, params)."""
    batches = [synthetic_batch(10 + i, 16, 16) for i in range(2)]
    big_state, big_history = _run_steps("data", batches, grad_accum=1)
    acc_state, acc_history = _run_steps("data", batches, grad_accum=2)
    for got, want in zip(acc_history, big_history):
        for key in ("loss", "grad_norm", "tokens", "examples", "domain_tokens", "lr"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    assert int(acc_state.step) == 2
    chex.assert_trees_all_close(acc_state.params, big_state.params, rtol=1e-5, atol=1e-7)


def test_per_domain_losses_match_manual_computation():
    batch = synthetic_batch(3, 16, 16)
    _, shardings, host_state, mesh = _compiled_step("mixed", 1)
    _, (metrics,) = _run_steps("mixed", [batch])
    logits = forward(
        CFG, host_state.params, batch["tokens"], batch["positions"], batch["segment_ids"]
    )
    losses = np.asarray(token_losses(logits, batch["targets"]))
    for d in range(NUM_DOMAINS):
        mask = (batch["domain_ids"] == d) * batch["weights"]
        np.testing.assert_allclose(metrics["domain_loss_sums"][d], np.sum(losses * mask), rtol=1e-5)
        np.testing.assert_allclose(metrics["domain_tokens"][d], np.sum(mask))
    total = np.sum(losses * batch["weights"]) / np.sum(batch["weights"])
    np.testing.assert_allclose(metrics["loss"], total, rtol=1e-5)
    np.testing.assert_allclose(metrics["examples"], 32)  # two packed examples in each of 16 rows

    eval_fn = train_step_lib.make_eval_step(CFG, shardings.params, mesh, num_groups=NUM_DOMAINS)
    params = jax.device_put(host_state.params, shardings.params)
    sums = jax.device_get(eval_fn(params, sharding.shard_batch(batch, mesh)))
    np.testing.assert_allclose(sums["loss_sums"], metrics["domain_loss_sums"], rtol=1e-5)
    np.testing.assert_allclose(sums["token_counts"], metrics["domain_tokens"])


def test_nonfinite_update_is_skipped_and_recorded():
    good = synthetic_batch(0, 16, 16)
    bad = dict(good, weights=good["weights"].copy())
    bad["weights"][0, -1] = np.nan
    state, history = _run_steps("data", [good, bad, good])
    assert [bool(m["is_finite"]) for m in history] == [True, False, True]
    assert int(state.step) == 1 and int(state.nonfinite_step) == 1
    ref_state, _ = _run_steps("data", [good])
    chex.assert_trees_all_equal(state.params, ref_state.params)


def test_schedule_and_weight_decay_mask():
    schedule = train_state.learning_rate_schedule(
        train_config(warmup_steps=4, schedule="linear", end_lr_fraction=0.0), total_steps=8
    )
    lrs = [float(schedule(i)) for i in range(9)]
    np.testing.assert_allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
    assert lrs[4] == pytest.approx(1e-3) and lrs[8] == pytest.approx(0.0, abs=1e-9)
    mask = train_state.weight_decay_mask(abstract_params(CFG))
    assert mask["layers"][0]["mlp"]["up_proj"]["kernel"] is True
    assert mask["layers"][0]["input_layernorm"]["scale"] is False
    assert mask["embed_tokens"] is False
