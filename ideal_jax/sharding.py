"""One device mesh with named axes (data, fsdp, tensor) and logical-axis rules.

Every parameter carries logical axis names (ideal_jax.model.transformer.logical_axes); RULES maps
them to mesh axes. A dimension that a mesh axis does not divide stays replicated along it, so any
model runs on any mesh (tiny test models on 8 fake devices included).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated). The batch is split over data and fsdp (FSDP is
# data parallelism whose parameters are sharded too); weights are sharded over fsdp on their
# model dimension and over tensor on heads / mlp hidden / vocab.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "norm": None,
}


def make_mesh(
    shape: Sequence[int] | dict[str, int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 (all remaining devices)."""
    if isinstance(shape, dict) or hasattr(shape, "items"):
        shape = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    shape = [int(s) for s in shape]
    devices = list(devices if devices is not None else jax.devices())
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot fill mesh shape {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"have {len(devices)}"
        )
    array = np.asarray(devices).reshape(shape)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec_for(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: dict[str, Any] = RULES
) -> PartitionSpec:
    """PartitionSpec for one array: mesh axes that do not divide a dimension are dropped."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical, shape):
        axes = [a for a in (rules.get(name) or ()) if a not in used and mesh.shape[a] > 1]
        kept = []
        for axis in axes:
            if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
        used.update(kept)
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*out)


def param_shardings(abstract: Any, logical: Any, mesh: Mesh, rules: dict[str, Any] = RULES) -> Any:
    """NamedShardings for a params pytree, from its shapes and logical axis names."""
    return jax.tree.map(
        lambda a, names: NamedSharding(mesh, spec_for(names, a.shape, mesh, rules)),
        abstract,
        logical,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str) or n is None for n in x),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays: rows over data x fsdp, sequence replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host's [B, T] numpy batch on the mesh.

    Single process: a plain device_put. Multi-process: each process passes its own rows and the
    global array is assembled without any host seeing the others' data.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(dict(batch), sharding)  # one batched transfer for all fields
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def sharded_init(init_fn, abstract: Any, logical: Any, mesh: Mesh, *args):
    """Run `init_fn(*args)` under jit with out_shardings: parameters are born sharded."""
    shardings = param_shardings(abstract, logical, mesh)
    return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


# Activation shardings. A jitted program's inputs and outputs carry shardings, but XLA must infer
# those of the activations in between, and it infers the residual stream [B, T, D] from whatever
# produced it: the embedding gather of a table sharded over (tensor, fsdp) yields D split over
# fsdp, so the backward pass must move [B, T, D] from rows-over-(data, fsdp) to D-over-fsdp, which
# the SPMD partitioner does by replicating the whole tensor ("involuntary full
# rematerialization"). The model pins its activations to rows-over-(data, fsdp), replicated over
# tensor, whenever it is traced inside `activation_mesh(mesh)`; `traced_in(mesh, fn)` wraps a
# function to be jitted so that its trace runs there. Outside, nothing is constrained (one device,
# or callers that place nothing).
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "ideal_jax_activation_mesh", default=None
)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """While active, `constrain_rows` pins activations to rows over (data, fsdp) on `mesh`."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def traced_in(mesh: Mesh | None, fn: Callable) -> Callable:
    """`fn`, traced inside `activation_mesh(mesh)` (wrap before jax.jit)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_mesh(mesh):
            return fn(*args, **kwargs)

    return wrapped


def constrain_spec(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x constrained to the sharding of its logical axes (RULES) on the activation mesh, when
    traced inside `activation_mesh`; x unchanged otherwise."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, spec_for(logical, x.shape, mesh))
    )


def constrain_rows(x: jax.Array) -> jax.Array:
    """x with its leading (row) axis over the mesh's data x fsdp axes (those that divide it) and
    every other axis replicated, when traced inside `activation_mesh`; x unchanged otherwise."""
    return constrain_spec(x, ("batch",) + (None,) * (x.ndim - 1))
