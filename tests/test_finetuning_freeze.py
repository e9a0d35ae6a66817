"""train.finetuning = freeze: only the top N decoder layers train (the rest bit-identical), the
frozen prefix's output is cached per example and equals recomputation, and resume is exact."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from ideal_jax import sharding
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import forward, init_params
from ideal_jax.train import finetuning as finetuning_lib
from ideal_jax.train import run_sft
from ideal_jax.train.prefix_cache import PrefixCache

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
STEPS_PER_EPOCH = 3
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def train_config(**overrides) -> ml_collections.ConfigDict:
    values = dict(
        learning_rate=3e-3,
        warmup_steps=1,
        schedule="constant",
        end_lr_fraction=1.0,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        grad_clip=1.0,
        grad_accum=1,
        batch_size=4,
        seq_len=16,
        epochs=2,
        log_every=1,
        checkpoint_every=2,
        keep_checkpoints=2,
        seed=0,
        finetuning="freeze",
        freeze_trainable_layers=1,
        prefix_cache=True,
        prefix_cache_gib=1.0,
    )
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def packed_batch(seed: int, rows: int = 4, seq_len: int = 16, order=(0, 1)) -> dict:
    """Two packed examples per row (prompt + response), then padding. `order` = (1, 0) packs
    the same two examples in the other order (other columns)."""
    rng = np.random.default_rng(seed)
    batch = {
        "tokens": np.zeros((rows, seq_len), np.int32),
        "targets": np.zeros((rows, seq_len), np.int32),
        "weights": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
        "domain_ids": np.full((rows, seq_len), -1, np.int32),
    }
    for r in range(rows):
        examples = []
        for _ in range(2):
            length = int(rng.integers(3, seq_len // 2))
            examples.append(rng.integers(1, CFG.vocab_size, length + 1))
        start = 0
        for segment, e in enumerate(order, start=1):
            toks = examples[e]
            length = len(toks) - 1
            span = slice(start, start + length)
            batch["tokens"][r, span] = toks[:-1]
            batch["targets"][r, span] = toks[1:]
            batch["segment_ids"][r, span] = segment
            batch["positions"][r, span] = np.arange(length)
            batch["domain_ids"][r, span] = 0
            batch["weights"][r, start + 1 : start + length] = 1.0
            start += length
    return batch


def batches_for_epoch(epoch: int, *, die_at: int | None = None):
    for index in range(STEPS_PER_EPOCH):
        if epoch * STEPS_PER_EPOCH + index == die_at:
            raise RuntimeError("simulated crash")
        # Epoch 1 repacks epoch 0's examples in the other order: the cache must still serve them.
        yield packed_batch(index, order=(0, 1) if epoch == 0 else (1, 0))


@functools.cache
def host_params():
    return jax.device_get(jax.jit(functools.partial(init_params, CFG))(jax.random.key(0)))


def mesh():
    return sharding.make_mesh((jax.device_count(), 1, 1))


def train(workdir, die_at=None, **overrides):
    train_cfg = train_config(**overrides)
    spec = finetuning_lib.from_config(train_cfg, CFG.num_layers)
    return run_sft(
        CFG,
        train_cfg,
        mesh(),
        workdir,
        functools.partial(batches_for_epoch, die_at=die_at),
        STEPS_PER_EPOCH,
        init_params=host_params(),
        domain_names=("d",),
        progress=False,
        compiler_options=FAST_COMPILE,
        finetuning=spec,
        prefix_cache_dir=str(workdir / "prefix_cache"),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("freeze")
    params, summary = train(workdir)
    return workdir, jax.device_get(params), summary


def _leaves(params):
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def test_frozen_parameters_are_bit_identical_and_top_layer_trains(reference):
    _, params, summary = reference
    before, after = _leaves(host_params()), _leaves(params)
    assert before.keys() == after.keys()
    trained = [k for k in before if k.startswith("['layers'][2]")]
    assert trained
    for name in before:
        if name in trained:
            continue
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert all(not np.array_equal(after[k], before[k]) for k in trained)
    assert summary["finetuning"] == "freeze" and summary["trainable_layers"] == 1
    layer = sum(np.size(x) for x in jax.tree.leaves(host_params()["layers"][2]))
    assert summary["trainable_parameters"] == layer


def _prefix_forward(params, batch):
    """The hidden state entering layer 2, from the packed rows' own forward."""
    return np.asarray(
        forward(
            CFG,
            params,
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            num_layers=2,
            return_hidden=True,
        )
    )


def test_cached_prefix_equals_recomputation(tmp_path):
    """The cache's [B, T, D] equals each example recomputed alone (bit for bit) and the packed
    row's own forward (to float rounding), whatever the packing, from memory and from disk."""
    params = jax.device_put(host_params())
    batch = packed_batch(5)
    swapped = packed_batch(5, order=(1, 0))
    direct = _prefix_forward(params, batch)
    real = batch["segment_ids"] > 0
    for memory_bytes in (1 << 30, 0):  # in memory; everything spilled to disk
        cache = PrefixCache(
            CFG,
            params,
            2,
            16,
            mesh(),
            rows=4,
            memory_bytes=memory_bytes,
            directory=str(tmp_path / str(memory_bytes)),
        )
        first = cache.hidden(batch)
        assert cache.computed == 8
        np.testing.assert_allclose(first[real], direct[real], rtol=1e-5, atol=1e-5)
        assert not first[~real].any()
        # The same examples packed the other way: read back (nothing computed), same values.
        again = cache.hidden(swapped)
        assert cache.computed == 8
        for r in range(4):
            for s_first, s_again in ((1, 2), (2, 1)):
                np.testing.assert_array_equal(
                    again[r][swapped["segment_ids"][r] == s_again],
                    first[r][batch["segment_ids"][r] == s_first],
                )
        # A fresh cache (nothing in memory) recomputes or reads the disk: the same bits.
        fresh = PrefixCache(
            CFG,
            params,
            2,
            16,
            mesh(),
            rows=4,
            memory_bytes=memory_bytes,
            directory=str(tmp_path / str(memory_bytes)),
        )
        np.testing.assert_array_equal(fresh.hidden(batch), first)
        assert fresh.computed == 0  # written through to the directory: read back, not recomputed


def test_prefix_cache_is_keyed_by_the_frozen_parameters(tmp_path):
    """Other frozen parameters never read this cache's entries (on disk, same directory)."""
    params = jax.device_put(host_params())
    batch = packed_batch(7)
    kwargs = dict(rows=4, memory_bytes=0, directory=str(tmp_path))
    first = PrefixCache(CFG, params, 2, 16, mesh(), **kwargs).hidden(batch)
    other = jax.tree.map(lambda x: x, host_params())
    other["layers"][0]["mlp"]["up_proj"]["kernel"] = other["layers"][0]["mlp"]["up_proj"][
        "kernel"
    ] * np.float32(1.5)
    cache = PrefixCache(CFG, jax.device_put(other), 2, 16, mesh(), **kwargs)
    second = cache.hidden(batch)
    assert cache.computed == 8
    assert not np.allclose(first, second)


def test_resume_after_exception_is_exact(reference, tmp_path):
    ref_dir, ref_params, ref_summary = reference
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, die_at=4)
    params, summary = train(tmp_path)
    assert summary["start_step"] == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref_params)
    assert summary["final_loss"] == ref_summary["final_loss"]


def test_freeze_without_cache_trains_the_same_layers(reference, tmp_path):
    """prefix_cache off: the step runs the frozen layers itself; same parameters to rounding."""
    _, ref_params, _ = reference
    params, _ = train(tmp_path, prefix_cache=False)
    params = jax.device_get(params)
    for name, x in _leaves(params).items():
        np.testing.assert_allclose(x, _leaves(ref_params)[name], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("n", [0, 4, -1])
def test_freeze_layers_outside_the_model_name_the_field(n):
    from ideal_jax.utils.errors import InputError

    with pytest.raises(InputError, match="train.freeze_trainable_layers"):
        finetuning_lib.from_config(train_config(freeze_trainable_layers=n), CFG.num_layers)


def test_freeze_with_grad_accum_matches_one_microbatch(reference, tmp_path):
    """Microbatches split the cached prefix [B, T, D] like the other batch fields."""
    _, ref_params, _ = reference
    params, _ = train(tmp_path, grad_accum=2)
    params = jax.device_get(params)
    for name, x in _leaves(params).items():
        np.testing.assert_allclose(x, _leaves(ref_params)[name], rtol=2e-4, atol=2e-5)


def test_cached_prefix_in_length_buckets_equals_the_packed_forward(tmp_path):
    """Rows of 64 tokens, examples of 3-31 tokens: each is computed in its own length bucket
    (16 or 32 columns, not 64), and the values equal the packed row's own forward."""
    params = jax.device_put(host_params())
    batch = packed_batch(11, rows=4, seq_len=64)
    direct = _prefix_forward(params, batch)
    real = batch["segment_ids"] > 0
    cache = PrefixCache(CFG, params, 2, 64, mesh(), rows=4, memory_bytes=1 << 30)
    assert [cache.bucket(n) for n in (3, 16, 17, 31, 33, 64)] == [16, 16, 32, 32, 64, 64]
    lengths = {int((batch["segment_ids"][r] == s).sum()) for r in range(4) for s in (1, 2)}
    assert max(lengths) <= 32 < 64  # every example computed in a narrower row than 64
    got = cache.hidden(batch)
    np.testing.assert_allclose(got[real], direct[real], rtol=1e-5, atol=1e-5)
    assert not got[~real].any()
