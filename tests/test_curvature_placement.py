"""The K-FAC factor pass on a mesh: the influence stage runs one jitted update per mesh, with the
factor state row-sharded in and out and donated, and memory_plan.compile_curvature_pass lowers
that very object (so the memory table describes what runs)."""

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding

from ideal_jax import sharding
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import memory_plan
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.model.config import preset
from ideal_jax.model.transformer import abstract_params, init_params, logical_axes

TINY = preset("tiny", 64).replace(num_layers=1)
LAYERS = ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj")


def _batch(rng, b=8, t=16):
    tokens = rng.integers(1, 64, size=(b, t)).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "weights": (np.arange(t)[None, :] >= t // 2).astype(np.float32).repeat(b, 0),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "domain_ids": np.zeros((b, t), np.int32),
    }


def _placed_tiny():
    """A (2, 2, 2) mesh and the tiny model's parameters initialised on it."""
    mesh = sharding.make_mesh((2, 2, 2))
    params, _ = sharding.sharded_init(
        functools.partial(init_params, TINY),
        abstract_params(TINY),
        logical_axes(TINY),
        mesh,
        jax.random.key(0),
    )
    return mesh, params


def test_the_stage_and_the_memory_plan_share_one_placed_donating_update(monkeypatch):
    mesh, params = _placed_tiny()
    # As the influence stage asks for it: one curvature per mesh the parameters are placed on.
    curvature = kfac_lib.curvature_for(
        problem_lib.lm_problem(TINY, LAYERS), "fisher", kfac_lib.params_mesh(params)
    )
    built = []
    original = kfac_lib.KfacCurvature.update_fn

    def spy(self, mesh_, state_like):
        fn = original(self, mesh_, state_like)
        built.append(fn)
        return fn

    monkeypatch.setattr(kfac_lib.KfacCurvature, "update_fn", spy)
    rng = np.random.default_rng(0)
    batches = [sharding.shard_batch(_batch(rng), mesh) for _ in range(2)]
    state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(1))
    # the factors leave the pass row-sharded over all 8 devices
    factors = [f.value for b in state.kfac.blocks_states for f in b.factors]
    for value in factors:
        assert isinstance(value.sharding, NamedSharding)
        expected = NamedSharding(mesh, kfac_lib.factor_partition_spec(value.shape, mesh))
        assert value.sharding.is_equivalent_to(expected, value.ndim), value.sharding.spec
    assert any(not v.sharding.is_fully_replicated for v in factors)  # rows really split
    memory_plan.compile_curvature_pass(TINY, mesh, LAYERS, batch_size=8, seq_len=16, mode="fisher")
    assert len(built) == 2 and built[0] is built[1]  # one object: what runs is what is planned


def test_the_placed_update_donates_the_previous_state():
    mesh, params = _placed_tiny()
    curvature = kfac_lib.curvature_for(problem_lib.lm_problem(TINY, LAYERS), "fisher")
    batch = sharding.shard_batch(_batch(np.random.default_rng(1)), mesh)
    state = curvature.init(params, batch, jax.random.key(0))
    state = kfac_lib.place_state(state, mesh)
    update = curvature.update_fn(mesh, state)
    new = update(state, params, batch, jax.random.key(2))
    old_factor = state.kfac.blocks_states[0].factors[0].value
    assert old_factor.is_deleted()  # donated: updated in place
    single = curvature.update(
        jax.device_get(curvature.init(params, batch, jax.random.key(0))),
        params,
        batch,
        jax.random.key(2),
    )
    np.testing.assert_allclose(
        np.asarray(new.kfac.blocks_states[0].factors[0].value),
        np.asarray(single.kfac.blocks_states[0].factors[0].value),
        rtol=1e-5,
        atol=1e-6,
    )
