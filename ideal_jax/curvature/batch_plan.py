"""The curvature pass's batch: how many rows of a given length fit a device (memory_plan.py plans
the layer groups; this sizes the batch each group's pass runs with), and the check the influence
stage makes before any pass when the device memory is known.
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh

from ideal_jax import sharding
from ideal_jax.curvature.memory_plan import (
    F32,
    HEADROOM,
    GiB,
    layer_curvature_bytes,
    layer_shapes,
    layer_update_bytes,
    param_bytes_per_device,
    plan_curvature_layer_groups,
)
from ideal_jax.model.config import ModelConfig
from ideal_jax.utils.errors import InputError

# The activation estimate below (margin 1) comes out at 1.14x and 1.02x of the compiled pass's
# total on the two tiny models of tests/test_memory_plan.py (CPU backend, (2,2,2) mesh) since the
# activations are pinned to rows (sharding.activation_mesh; before, XLA's replicated temporaries
# put it at 0.7-1.0x and the margin was 1.5); this margin keeps the plan an upper bound there.
ACTIVATION_MARGIN = 1.15


def curvature_activation_bytes_per_token(
    model_cfg: ModelConfig, mesh: Mesh, seq_len: int, loss_rows: int | None = None
) -> int:
    """Estimated f32 bytes one token keeps alive in a curvature pass (forward saved for the
    backward, no remat; per device, tensor-parallel dims split over the tensor axis).

    Per decoder layer: residual, two norms, attention and MLP outputs (6 D); q, k, v and the
    attention output (2 H E + 2 K E); dense attention scores and probabilities (2 H T); gate,
    up, activation and product (4 F). Head: logits and softmax at the loss rows only
    (`loss_rows` of the T positions of a row; all of them when None). An estimate, checked
    against the compiled pass in tests/test_memory_plan.py.
    """
    c = model_cfg
    t = mesh.shape["tensor"]
    per_layer = (
        6 * c.hidden_size + (2 * c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim) / t
    )
    per_layer += 2 * c.num_heads * seq_len / t + 4 * c.intermediate_size / t
    share = 1.0 if loss_rows is None else min(loss_rows, seq_len) / seq_len
    head = 2 * c.vocab_size * share / t + 2 * c.hidden_size
    return int(F32 * (c.num_layers * per_layer + head))


def curvature_pass_bytes(
    model_cfg: ModelConfig,
    group: Sequence[str],
    mesh: Mesh,
    batch_size: int,
    seq_len: int,
    *,
    ekfac: bool = True,
    loss_rows: int | None = None,
) -> int:
    """Per-device bytes of one layer group's curvature pass at a global batch of `batch_size`
    rows: parameters, the group's row-sharded state and unsharded update temporaries, and the
    activations of this device's tokens."""
    shapes = layer_shapes(model_cfg, list(group))
    state = sum(
        layer_curvature_bytes(d_in, d_out, mesh, ekfac=ekfac) + layer_update_bytes(d_in, d_out)
        for d_in, d_out in shapes.values()
    )
    tokens = batch_size * seq_len / sharding.batch_divisor(mesh)
    per_token = curvature_activation_bytes_per_token(model_cfg, mesh, seq_len, loss_rows)
    activations = ACTIVATION_MARGIN * tokens * per_token
    return int(param_bytes_per_device(model_cfg, mesh) + state + activations)


def plan_curvature_batch(
    model_cfg: ModelConfig,
    layers: str | Sequence[str],
    mesh: Mesh,
    device_memory_bytes: int,
    seq_len: int,
    *,
    ekfac: bool = True,
    factor_fraction: float = 0.5,
    loss_rows: int | None = None,
) -> int:
    """The largest global curvature batch (a power of two times the mesh's batch divisor) whose
    pass fits every layer group in a device after headroom; InputError when not even one row
    per data shard does."""
    groups = plan_curvature_layer_groups(
        model_cfg, layers, mesh, device_memory_bytes, factor_fraction=factor_fraction, ekfac=ekfac
    )
    usable = device_memory_bytes * (1.0 - HEADROOM)

    def fits(batch: int) -> bool:
        return all(
            curvature_pass_bytes(
                model_cfg, g, mesh, batch, seq_len, ekfac=ekfac, loss_rows=loss_rows
            )
            <= usable
            for g in groups
        )

    batch = sharding.batch_divisor(mesh)
    if not fits(batch):
        need = max(
            curvature_pass_bytes(model_cfg, g, mesh, batch, seq_len, ekfac=ekfac) for g in groups
        )
        raise InputError(
            f"one row per data shard of {seq_len} tokens needs {need / GiB:.1f} GiB per device, "
            f"over {usable / GiB:.1f} GiB: shorten the rows or use a bigger mesh",
            field="curvature.batch_size",
        )
    while fits(2 * batch):
        batch *= 2
    return batch


def check_curvature_batch(
    model_cfg: ModelConfig,
    layers: str | Sequence[str],
    mesh: Mesh,
    device_memory_bytes: int,
    seq_len: int,
    batch_size: int,
    *,
    ekfac: bool = True,
    loss_rows: int | None = None,
) -> int:
    """InputError before any work when `batch_size` rows of `seq_len` tokens would not fit the
    device, naming the size that would; returns that size."""
    fits = plan_curvature_batch(
        model_cfg, layers, mesh, device_memory_bytes, seq_len, ekfac=ekfac, loss_rows=loss_rows
    )
    if batch_size > fits:
        raise InputError(
            f"{batch_size} rows of {seq_len} tokens do not fit a "
            f"{device_memory_bytes / GiB:.1f} GiB device in the curvature pass (mesh "
            f"{dict(mesh.shape)}); the plan says {fits} would",
            field="curvature.batch_size",
        )
    return fits
