"""Forward and loss/gradient on 8 fake CPU devices match the single-device results."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ideal_jax import sharding
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import (
    abstract_params,
    forward,
    init_params,
    logical_axes,
    token_losses,
)

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
)
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mixed": (2, 2, 2)}


def _loss(params, tokens, segments):
    logits = forward(CFG, params, tokens, segment_ids_bt=segments)
    weights = (segments > 0).astype(jnp.float32)
    return jnp.sum(token_losses(logits[:, :-1], tokens[:, 1:]) * weights[:, 1:]) / jnp.sum(
        weights[:, 1:]
    )


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG.vocab_size, (8, 16)).astype(np.int32)
    segments = np.ones((8, 16), np.int32)
    segments[:, 12:] = 0  # padding
    segments[::2, 6:12] = 2  # packed second example
    return tokens, segments


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_and_grad_match_single_device(name):
    assert jax.device_count() == 8
    tokens, segments = _inputs()
    params = init_params(CFG, jax.random.key(0))
    ref_logits = forward(CFG, params, tokens, segment_ids_bt=segments)
    ref_loss, ref_grad = jax.value_and_grad(_loss)(params, tokens, segments)

    mesh = sharding.make_mesh(MESHES[name])
    sharded_params, shardings = sharding.sharded_init(
        functools.partial(init_params, CFG),
        abstract_params(CFG),
        logical_axes(CFG),
        mesh,
        jax.random.key(0),
    )
    batch = sharding.shard_batch({"tokens": tokens, "segments": segments}, mesh)
    logits = jax.jit(lambda p, t, s: forward(CFG, p, t, segment_ids_bt=s))(
        sharded_params, batch["tokens"], batch["segments"]
    )
    loss, grad = jax.jit(jax.value_and_grad(_loss), out_shardings=(None, shardings))(
        sharded_params, batch["tokens"], batch["segments"]
    )
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    # Parameters really are sharded along the axes the rules name.
    gate = sharded_params["layers"][0]["mlp"]["gate_proj"]["kernel"]
    if name == "tensor":
        assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    if name == "fsdp":
        assert gate.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_indivisible_dimensions_stay_replicated():
    mesh = sharding.make_mesh((1, 1, 8))
    spec = sharding.spec_for(("embed", "mlp"), (32, 12), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None)


def test_mesh_shape_errors_are_clear():
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh((4, 4, 1))
