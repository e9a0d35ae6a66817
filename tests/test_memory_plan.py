"""Memory planning: AOT memory of the sharded train step / curvature pass, and layer groups."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from configs import common
from ideal_jax import memory_plan, sharding
from ideal_jax.model.config import preset
from ideal_jax.utils.errors import InputError

TINY = preset("tiny", 256).replace(num_layers=1)  # one layer: same programs, half the compile
TRAIN_CFG = common.base_config().train
LLAMA_8B = preset("llama3_8b", 128256)
MLP_8B = memory_plan.layer_shapes(LLAMA_8B, "mlp")


def _mesh(shape) -> AbstractMesh:
    """Planning needs only axis sizes: an abstract mesh stands in for 8 or 64 real devices."""
    return AbstractMesh(tuple(shape), sharding.MESH_AXES)


def test_train_step_aot_is_sharded_and_donated():
    mesh = sharding.make_mesh((2, 2, 2))
    batch, seq = 8, 32
    compiled = memory_plan.compile_train_step(TINY, TRAIN_CFG, mesh, batch_size=batch, seq_len=seq)
    report = memory_plan.report_from_compiled("tiny train", compiled, mesh)
    params = memory_plan.param_bytes_per_device(TINY, mesh)
    batch_bytes = 6 * (batch // 4) * seq * 4  # six [B, T] 4-byte arrays, rows over data x fsdp
    # params + Adam mu + nu, each sharded like the params, plus the batch and a few scalars.
    assert 3 * params + batch_bytes <= report.argument_bytes <= 3 * params + batch_bytes + 1024
    replicated = 4 * TINY.num_params()
    assert params < replicated / 2  # the rules really shard the tiny model on this mesh
    assert report.alias_bytes >= 3 * params  # the donated state is updated in place
    assert 0 < report.total_bytes < report.argument_bytes + report.output_bytes + report.temp_bytes
    table = memory_plan.format_table([report])
    assert "tiny train" in table and "2,2,2" in table


def test_curvature_pass_aot_keeps_factors_row_sharded():
    mesh = sharding.make_mesh((2, 2, 2))
    shapes = memory_plan.layer_shapes(TINY, "mlp")
    compiled = memory_plan.compile_curvature_pass(
        TINY, mesh, tuple(shapes), batch_size=8, seq_len=32
    )
    report = memory_plan.report_from_compiled("tiny kfac", compiled, mesh)
    factor_elems = sum(d_in * d_in + d_out * d_out for d_in, d_out in shapes.values())
    # The state (factors A, G + cached eigenvectors) leaves the pass 8-way sharded: far less than
    # one replicated copy of the factors alone, at least the sharded factors and eigenbases.
    assert 2 * factor_elems * 4 // 8 <= report.output_bytes < factor_elems * 4
    assert report.alias_bytes > 0  # donated factor state


def test_factor_partition_spec():
    mesh = _mesh((1, 16, 4))
    assert memory_plan.factor_partition_spec((14336, 14336), mesh) == PartitionSpec(
        ("fsdp", "tensor"), None
    )
    # 4097 rows (a bias row) divide by nothing: replicated, never an uneven split.
    assert memory_plan.factor_partition_spec((4097, 4097), mesh) == PartitionSpec(None, None)
    assert memory_plan.factor_partition_spec((8,), mesh) == PartitionSpec()


def test_8b_mlp_factors_are_about_170_gb():
    total = sum(2 * 4 * (d_in**2 + d_out**2) for d_in, d_out in MLP_8B.values())
    assert len(MLP_8B) == 96 and 165e9 < total < 175e9
    one = _mesh((1, 1, 1))
    per_device = sum(
        memory_plan.layer_curvature_bytes(*s, one, ekfac=False) for s in MLP_8B.values()
    )
    np.testing.assert_allclose(per_device, total, rtol=1e-3)  # + eigenvalues only


def _check_groups(groups, mesh, memory):
    assert [p for g in groups for p in g] == list(MLP_8B)  # every layer once, in order
    budget = memory_plan.curvature_factor_budget(LLAMA_8B, MLP_8B, mesh, memory)
    for group in groups:
        need = sum(
            memory_plan.layer_curvature_bytes(*MLP_8B[p], mesh)
            + memory_plan.layer_update_bytes(*MLP_8B[p])
            for p in group
        )
        assert need <= budget
    assert max(map(len, groups)) - min(map(len, groups)) <= 1  # balanced passes


def test_8b_layer_groups_shrink_with_more_devices_and_memory():
    memory = 80 * memory_plan.GiB
    plans = {}
    for shape in ((1, 1, 1), (1, 8, 1), (1, 16, 4)):
        mesh = _mesh(shape)
        plans[shape] = memory_plan.plan_curvature_layer_groups(LLAMA_8B, "mlp", mesh, memory)
        _check_groups(plans[shape], mesh, memory)
    # Even 64 devices need groups: each device builds the unsharded per-batch XᵀX / δᵀδ first.
    assert len(plans[(1, 1, 1)]) > len(plans[(1, 8, 1)]) > len(plans[(1, 16, 4)]) > 1
    smaller = memory_plan.plan_curvature_layer_groups(
        LLAMA_8B, "mlp", _mesh((1, 8, 1)), 40 * memory_plan.GiB
    )
    assert len(smaller) > len(plans[(1, 8, 1)])
    bigger = memory_plan.plan_curvature_layer_groups(
        LLAMA_8B, "mlp", _mesh((1, 16, 4)), 1000 * memory_plan.GiB
    )
    assert bigger == [list(MLP_8B)]


def test_layer_that_cannot_fit_is_an_input_error():
    with pytest.raises(InputError, match="curvature.layers"):
        memory_plan.plan_curvature_layer_groups(
            LLAMA_8B, ["lm_head"], _mesh((1, 1, 1)), 80 * memory_plan.GiB
        )
    with pytest.raises(InputError, match="not linear layers"):
        memory_plan.plan_curvature_layer_groups(TINY, ["layers.9.mlp.up_proj"], _mesh((1, 1, 1)), 1)


def test_tiny_plan_on_the_test_mesh():
    mesh = sharding.make_mesh((2, 2, 2))
    assert jax.device_count() == 8
    groups = memory_plan.plan_curvature_layer_groups(TINY, "mlp", mesh, memory_plan.GiB)
    assert groups == [["layers.0.mlp.down_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]]
