"""Memory planning: AOT memory of the sharded train step / curvature pass, and layer groups."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from configs import common
from ideal_jax import sharding
from ideal_jax.curvature import batch_plan as curvature_batch
from ideal_jax.curvature import memory_plan
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


@pytest.mark.parametrize(
    ("hidden", "layers"), [(64, 1), pytest.param(128, 2, marks=pytest.mark.slow)]
)
def test_curvature_pass_estimate_tracks_the_compiled_pass(hidden, layers):
    """The planner's per-device bytes vs the compiled factor pass (8 CPU devices, rows of 128
    tokens, where activations dominate): an estimate, within 0.8-1.6x of what XLA allocates."""
    model = preset("tiny", 256).replace(
        num_layers=layers, hidden_size=hidden, intermediate_size=4 * hidden, head_dim=hidden // 4
    )
    mesh = sharding.make_mesh((2, 2, 2))
    mlp = tuple(memory_plan.layer_shapes(model, "mlp"))
    compiled = memory_plan.compile_curvature_pass(model, mesh, mlp, batch_size=32, seq_len=128)
    total = memory_plan.report_from_compiled("pass", compiled, mesh).total_bytes
    estimate = curvature_batch.curvature_pass_bytes(model, mlp, mesh, 32, 128)
    assert 0.8 <= estimate / total <= 1.6, (estimate, total)


def test_8b_mlp_curvature_batch_is_sized_to_fit_8x80gib():
    mesh = _mesh((1, 8, 1))
    memory = 80 * memory_plan.GiB
    # per token, by hand: 32 layers × (6·4096 + 2·32·128 + 2·8·128 + 2·32·1024 scores
    # + 4·14336) + 2·128256·256/1024 logits + 2·4096, in f32
    per_layer = 6 * 4096 + 2 * 32 * 128 + 2 * 8 * 128 + 2 * 32 * 1024 + 4 * 14336
    by_hand = 4 * (32 * per_layer + 2 * 128256 * 256 // 1024 + 2 * 4096)
    got = curvature_batch.curvature_activation_bytes_per_token(LLAMA_8B, mesh, 1024, loss_rows=256)
    assert got == by_hand
    batch = curvature_batch.plan_curvature_batch(LLAMA_8B, "mlp", mesh, memory, 1024, loss_rows=256)
    groups = memory_plan.plan_curvature_layer_groups(LLAMA_8B, "mlp", mesh, memory)

    def need(b):
        return max(
            curvature_batch.curvature_pass_bytes(LLAMA_8B, g, mesh, b, 1024, loss_rows=256)
            for g in groups
        )

    usable = memory * (1 - memory_plan.HEADROOM)
    assert batch >= 8 and batch % 8 == 0
    assert need(batch) <= usable < need(2 * batch)  # the largest that fits
    with pytest.raises(InputError, match=f"the plan says {batch} would") as err:
        curvature_batch.check_curvature_batch(LLAMA_8B, "mlp", mesh, memory, 1024, 2 * batch)
    assert err.value.field == "curvature.batch_size"
    # rows too long for even one per data shard: said so, with the sizes
    with pytest.raises(InputError, match="one row per data shard"):
        curvature_batch.plan_curvature_batch(LLAMA_8B, "mlp", mesh, memory, 8192)


def test_the_influence_stage_refuses_a_curvature_batch_that_does_not_fit(tmp_path, monkeypatch):
    """Device memory given (curvature.device_memory_gib): a batch over the plan stops the stage
    before any pass, naming the field and the size that would fit."""
    from config_helpers import tiny_config

    from ideal_jax.curvature import kfac as kfac_lib
    from ideal_jax.data import mixture
    from ideal_jax.data import suite as suite_lib
    from ideal_jax.influence import stage
    from ideal_jax.model import loading

    cfg = tiny_config()
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, str(tmp_path))
    model_cfg, params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=0)
    layers = tuple(memory_plan.layer_shapes(model_cfg, cfg.curvature.layers))
    ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
    mix = mixture.build_mixture(ids, None, seed=0, keep_total=True)
    # A device on which the plan (layer groups and all) has room for half of cfg's curvature rows
    # at the stage's own row length and loss rows, found by bisection on the memory (so the
    # check, not the estimate's constants, decides).
    items, _ = stage.subsample(suite, mix, cfg.curvature, 0)
    longest = max(len(t.input_ids) for t in items + suite.reference_tokenized)
    seq_len = stage.row_length(longest, cfg.train.seq_len)
    half = cfg.curvature.batch_size // 2
    assert half % sharding.batch_divisor(mesh) == 0

    def planned(memory: float) -> int:
        try:
            return curvature_batch.plan_curvature_batch(
                model_cfg, layers, mesh, int(memory), seq_len,
                loss_rows=stage.loss_rows_per_example(items),
            )  # fmt: skip
        except InputError:
            return 0

    lo, hi = 1e3, 1e12  # planned(lo) < half <= planned(hi)
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if planned(mid) >= half else (mid, hi)
    assert planned(hi) == half
    cfg = tiny_config(**{"curvature.device_memory_gib": hi / memory_plan.GiB})
    passes = []
    monkeypatch.setattr(kfac_lib, "accumulate_factors", lambda *a, **k: passes.append(1))
    with pytest.raises(InputError, match="the plan says") as err:
        stage.influence_for_round(
            cfg.curvature, cfg.influence, model_cfg, params, suite, mix, mesh,
            seed=0, train_seq_len=cfg.train.seq_len,
        )  # fmt: skip
    assert err.value.field == "curvature.batch_size"
    assert passes == []  # refused before the factor pass
