"""Memory planning without the hardware: AOT compilation on stand-in devices, layer groups.

Two tools:

1. Ahead-of-time memory tables. `compile_train_step` and `compile_curvature_pass` lower the real
   jitted functions (the trainer's `train_step`, the K-FAC factor-accumulation pass of
   `ideal_jax.curvature.kfac`) on *abstract* inputs only (`jax.ShapeDtypeStruct` carrying their
   `NamedSharding`), compile them for a mesh and read XLA's buffer assignment
   (`compiled.memory_analysis()`): per-device bytes of arguments, outputs, temporaries. Nothing is
   allocated, so an 8B model can be planned for a 64-device mesh on a laptop whose CPU devices stand
   in (`XLA_FLAGS=--xla_force_host_platform_device_count=64`, see benchmarks/aot_memory.py).
   Caveat: the CPU backend fuses differently from GPU/TPU; arguments and outputs are exact,
   temporaries are an estimate (CPU tends to overstate them: it keeps bf16 dots in f32).

2. Curvature layer groups. An 8B model's MLP K-FAC factors are ~85 GB in f32, ~170 GB with their
   eigenbases. The documented choice, applied automatically:
     - every factor (A = [D_in(+1)]², G = [D_out]², their eigenvectors, the EK-FAC correction
       [D_in(+1), D_out]) is sharded along its rows over all mesh axes whose product divides the
       dimension (`factor_partition_spec`). Why rows over every device: the update A += XᵀX / R
       contracts over tokens, which are already split over data x fsdp, so a row-sharded result
       costs a reduce-scatter instead of an all-reduce, and memory falls by the device count;
     - sharding the stored factors is not enough: every device first computes its tokens' *whole*
       [D, D] contributions XᵀX and δᵀδ for each tagged layer, then reduce-scatters them. So a
       layer costs its row-sharded state plus its unsharded per-batch contributions, and layers
       are split into groups processed one after another (each group: a factor pass,
       eigendecomposition, its share of the inverse products; only one group's factors live at a
       time). `plan_curvature_layer_groups` returns those groups, in layer order, balanced.
   The budget: `factor_fraction` of what remains of a device after headroom, the parameters'
   share, and the largest factor gathered whole for its eigendecomposition (eigh does not
   partition): the rest is left to the pass's activations. Those are large (f32, no remat, dense
   attention scores): check them with benchmarks/aot_memory.py and size `curvature.batch_size`
   (tokens per device) so that the compiled pass fits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from ideal_jax import sharding
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import abstract_params, logical_axes
from ideal_jax.utils.errors import InputError

GiB = 1 << 30
F32 = 4
# Fraction of a device kept free for the runtime, fragmentation and collectives' buffers.
HEADROOM = 0.1
# eigh of an n x n matrix: input, eigenvectors and LAPACK/cuSOLVER workspace, ~3 n² in all.
EIGH_COPIES = 3
BATCH_KEYS = ("tokens", "targets", "weights", "segment_ids", "positions", "domain_ids")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled program (XLA buffer assignment)."""

    name: str
    mesh_shape: dict[str, int]
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int  # outputs that reuse (donated) argument buffers: counted once

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def report_from_compiled(name: str, compiled: Any, mesh: Mesh) -> MemoryReport:
    stats = compiled.memory_analysis()
    return MemoryReport(
        name=name,
        mesh_shape=dict(mesh.shape),
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
    )


def _human(n_bytes: int) -> str:
    """Bytes as G (GiB) or M (MiB): one table holds both a tiny model and an 8B one."""
    if abs(n_bytes) >= GiB:
        return f"{n_bytes / GiB:.2f}G"
    return f"{n_bytes / (1 << 20):.2f}M"


def format_table(reports: Sequence[MemoryReport]) -> str:
    """A fixed-width table of per-device bytes, one row per report."""
    head = f"{'program':<44} {'mesh (d,f,t)':>13} {'args':>9} {'outputs':>9} {'temps':>9}"
    head += f" {'aliased':>9} {'total':>9}"
    lines = [head, "-" * len(head)]
    for r in reports:
        mesh = ",".join(str(r.mesh_shape.get(a, 1)) for a in sharding.MESH_AXES)
        cells = (r.argument_bytes, r.output_bytes, r.temp_bytes, r.alias_bytes, r.total_bytes)
        lines.append(f"{r.name:<44} {mesh:>13} " + " ".join(f"{_human(c):>9}" for c in cells))
    lines.append("(per device; G = GiB, M = MiB; total = args + outputs + temps - aliased)")
    return "\n".join(lines)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings: what `.lower` needs, no memory allocated."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def abstract_batch(mesh: Mesh, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A global [B, T] Batch of abstract arrays, rows over data x fsdp."""
    if batch_size % sharding.batch_divisor(mesh):
        raise InputError(
            f"batch_size={batch_size} is not a multiple of data x fsdp = "
            f"{sharding.batch_divisor(mesh)}",
            field="train.batch_size",
        )
    rows = sharding.batch_sharding(mesh)
    dtypes = {"weights": jnp.float32}
    return {
        k: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes.get(k, jnp.int32), sharding=rows)
        for k in BATCH_KEYS
    }


def compile_train_step(
    model_cfg: ModelConfig,
    train_cfg: Any,
    mesh: Mesh,
    *,
    batch_size: int,
    seq_len: int,
    num_domains: int = 1,
    grad_accum: int = 1,
) -> Any:
    """The trainer's jitted train_step (donated, sharded state) compiled on abstract inputs."""
    from ideal_jax.train import state as state_lib
    from ideal_jax.train import step as step_lib

    optimizer = state_lib.make_optimizer(train_cfg, total_steps=1000)
    abstract = state_lib.abstract_train_state(model_cfg, optimizer)
    shardings = state_lib.state_shardings(abstract, model_cfg, mesh)
    step_fn = step_lib.make_train_step(
        model_cfg, optimizer, shardings, mesh, num_domains=num_domains, grad_accum=grad_accum
    )
    batch = abstract_batch(mesh, batch_size, seq_len)
    return step_fn.lower(with_shardings(abstract, shardings), batch).compile()


def factor_partition_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The factors' placement (curvature/kfac.py, where the pass uses it)."""
    from ideal_jax.curvature.kfac import factor_partition_spec as spec

    return spec(shape, mesh)


def curvature_state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a CurvatureState: 2-D leaves row-sharded, everything else replicated."""
    from ideal_jax.curvature.kfac import state_shardings

    return state_shardings(abstract_state, mesh)


def compile_curvature_pass(
    model_cfg: ModelConfig,
    mesh: Mesh,
    layers: Sequence[str],
    *,
    batch_size: int,
    seq_len: int,
    mode: str = "empirical",
) -> Any:
    """One K-FAC factor-accumulation update (kfac-jax, f32, tagged `layers`) on abstract inputs.

    The factor state is row-sharded (`curvature_state_shardings`) in and out, and donated.
    """
    from ideal_jax.curvature import kfac as kfac_lib
    from ideal_jax.curvature import problem as problem_lib

    model_cfg = model_cfg.replace(dtype="float32", remat=False)  # how the curvature pass runs
    curvature = kfac_lib.curvature_for(problem_lib.lm_problem(model_cfg, tuple(layers)), mode, mesh)
    params_sh = sharding.param_shardings(abstract_params(model_cfg), logical_axes(model_cfg), mesh)
    params = with_shardings(abstract_params(model_cfg), params_sh)
    batch = abstract_batch(mesh, batch_size, seq_len)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    # eval_shape traces kfac-jax's init (it finds the tagged blocks) without allocating factors.
    abstract_state = jax.eval_shape(curvature.init, params, batch, key)
    state_sh = curvature_state_shardings(abstract_state, mesh)
    # The very jitted object the influence stage runs (kfac.accumulate_factors on a mesh).
    update = curvature.update_fn(mesh, abstract_state)
    return update.lower(with_shardings(abstract_state, state_sh), params, batch, key).compile()


# -- planning without compiling -----------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _abstract_model(model_cfg: ModelConfig) -> tuple[Any, Any]:
    """(abstract params, logical axes), memoised: tracing a 32-layer NNX model takes seconds and
    a plan asks several times. Callers must not mutate the returned trees."""
    return abstract_params(model_cfg), logical_axes(model_cfg)


def layer_shapes(model_cfg: ModelConfig, layers: str | Sequence[str]) -> dict[str, tuple[int, int]]:
    """path → (D_in, D_out) of the selected linear layers (a preset name, regexes or paths)."""
    abstract, _ = _abstract_model(model_cfg)
    all_layers = layers_lib.linear_layer_paths(abstract)
    if isinstance(layers, str):
        with warnings.catch_warnings():  # select_layers warns on big factors: we plan for them
            warnings.simplefilter("ignore", UserWarning)
            layers = layers_lib.select_layers(abstract, layers)
    unknown = [p for p in layers if p not in all_layers]
    if unknown:
        raise InputError(
            f"not linear layers of this model: {unknown[:4]}", field="curvature.layers"
        )
    return {p: all_layers[p] for p in layers}


def _per_device(shape: tuple[int, ...], mesh: Mesh, spec: PartitionSpec) -> int:
    split = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else entry or ():
            split *= mesh.shape[axis]
    return math.prod(shape) * F32 // split


def layer_curvature_bytes(d_in: int, d_out: int, mesh: Mesh, *, ekfac: bool = True) -> int:
    """Per-device bytes of one layer's curvature state under `factor_partition_spec`.

    A and G, their eigenvectors (same shapes), eigenvalues, and the EK-FAC correction. kfac-jax's
    dense blocks carry the bias row in A only when the layer has a bias; Llama's have none.
    """
    total = 0
    for d in (d_in, d_out):
        square = (d, d)
        total += 2 * _per_device(square, mesh, factor_partition_spec(square, mesh)) + d * F32
    if ekfac:
        total += _per_device((d_in, d_out), mesh, factor_partition_spec((d_in, d_out), mesh))
    return total


def layer_update_bytes(d_in: int, d_out: int) -> int:
    """Per-device temporaries of one factor update: the unsharded XᵀX [D_in]² and δᵀδ [D_out]²."""
    return (d_in * d_in + d_out * d_out) * F32


def param_bytes_per_device(model_cfg: ModelConfig, mesh: Mesh) -> int:
    """f32 parameters under the logical-axis rules (what every curvature pass holds)."""
    abstract, logical = _abstract_model(model_cfg)
    specs = sharding.param_shardings(abstract, logical, mesh)
    return sum(
        _per_device(a.shape, mesh, s.spec)
        for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(specs))
    )


def curvature_factor_budget(
    model_cfg: ModelConfig,
    shapes: dict[str, tuple[int, int]],
    mesh: Mesh,
    device_memory_bytes: int,
    *,
    factor_fraction: float = 0.5,
) -> int:
    """Bytes per device the factors of one layer group may take (module docstring)."""
    largest = max(max(d_in, d_out) for d_in, d_out in shapes.values())
    free = device_memory_bytes * (1.0 - HEADROOM) - param_bytes_per_device(model_cfg, mesh)
    free -= EIGH_COPIES * largest * largest * F32
    return int(max(free, 0) * factor_fraction)


def plan_curvature_layer_groups(
    model_cfg: ModelConfig,
    layers: str | Sequence[str],
    mesh: Mesh,
    device_memory_bytes: int,
    *,
    factor_fraction: float = 0.5,
    ekfac: bool = True,
) -> list[list[str]]:
    """Layer groups (in layer order) whose curvature memory fits one device's factor budget.

    A layer costs its row-sharded state (`layer_curvature_bytes`) plus the unsharded per-batch
    contributions of the factor update (`layer_update_bytes`).

    One group holding every layer when everything fits; otherwise consecutive layers are packed
    greedily. Raises InputError when a single layer's factors exceed the budget (e.g. an LM head
    with a vocabulary² output factor on too few devices): exclude it or use a bigger mesh.
    """
    shapes = layer_shapes(model_cfg, layers)
    budget = curvature_factor_budget(
        model_cfg, shapes, mesh, device_memory_bytes, factor_fraction=factor_fraction
    )
    costs = []
    for path, (d_in, d_out) in shapes.items():
        need = layer_curvature_bytes(d_in, d_out, mesh, ekfac=ekfac)
        need += layer_update_bytes(d_in, d_out)
        if need > budget:
            raise InputError(
                f"curvature state of layer {path!r} ([{d_in}, {d_out}]) needs {need / GiB:.2f} GiB "
                f"per device on mesh {dict(mesh.shape)}, over the factor budget of "
                f"{budget / GiB:.2f} GiB of a {device_memory_bytes / GiB:.1f} GiB device",
                field="curvature.layers",
            )
        costs.append((path, need))
    # Fewest groups first (greedy), then the same number of groups with balanced sizes: equal
    # passes instead of a short last one.
    greedy, used = 0, budget + 1
    for _, need in costs:
        greedy, used = (greedy + 1, need) if used + need > budget else (greedy, used + need)
    for count in range(greedy, len(costs) + 1):
        bounds = [round(i * len(costs) / count) for i in range(count + 1)]
        chunks = [costs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        if all(sum(need for _, need in chunk) <= budget for chunk in chunks):
            return [[path for path, _ in chunk] for chunk in chunks]
    raise AssertionError("unreachable: one layer per group always fits")
