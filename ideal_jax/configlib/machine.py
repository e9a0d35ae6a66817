"""The config against the machine it runs on: the mesh and the batch against the devices, and
every path the config names against the file system (checked before the workdir is created)."""

from __future__ import annotations

import math
import os
from typing import Any

from ideal_jax.configlib.checks import MESH_AXES, MISSING, get_field
from ideal_jax.utils.errors import InputError


def check_machine(cfg, device_count: int, process_count: int = 1) -> None:
    """The config against the devices it runs on (jax.device_count(), after the distributed
    runtime starts): the mesh must use them all, and a training batch must split into
    grad_accum microbatches whose rows divide over the mesh's data x fsdp devices. InputError
    naming the field, before the workdir is created."""
    mesh = {axis: get_field(cfg, f"mesh.{axis}") for axis in MESH_AXES}
    if MISSING in mesh.values() or get_field(cfg, "mode") == "export":  # export uses no mesh
        return
    shape = ", ".join(f"{a}={v}" for a, v in mesh.items())
    explicit = [a for a, v in mesh.items() if v not in (-1, 1)] or ["data"]
    known = math.prod(v for v in mesh.values() if v != -1)
    hint = "set one axis to -1 to use all of them (e.g. --config.mesh.data=-1)"
    if -1 in mesh.values():
        if device_count % known:
            raise InputError(
                f"mesh ({shape}) cannot use the {device_count} devices of this machine: "
                f"{known} does not divide {device_count}",
                field=f"mesh.{explicit[0]}",
            )
        mesh[next(a for a, v in mesh.items() if v == -1)] = device_count // known
    elif known != device_count:
        raise InputError(
            f"mesh ({shape}) needs {known} devices, this machine has {device_count}; {hint}",
            field=f"mesh.{explicit[0]}",
        )
    batch, accum = get_field(cfg, "train.batch_size"), get_field(cfg, "train.grad_accum")
    if MISSING in (batch, accum) or get_field(cfg, "mode") not in ("ideal", "sft", "compare"):
        return
    divisor = mesh["data"] * mesh["fsdp"]
    if batch % accum or (batch // accum) % divisor:
        raise InputError(
            f"{batch} rows must split into grad_accum={accum} microbatches whose rows divide "
            f"evenly over the mesh's data x fsdp = {divisor} devices",
            field="train.batch_size",
        )
    if batch % process_count:
        raise InputError(
            f"{batch} rows are not a multiple of the {process_count} processes",
            field="train.batch_size",
        )


# Config fields that name local files or directories (a dict field: each of its values), with
# the modes and settings that read them.
PATH_FIELDS = (
    "data.domains",
    "data.source",
    "data.reference",
    "data.reference_source",
    "data.tokenizer",
    "model.path",
    "daar.pool",
    "daar.probe",
    "daar.seed_pairs",
)


def check_paths(cfg) -> None:
    """Every file or directory the config names exists (InputError naming the field), so a typo
    in a path stops the run before its workdir exists, not after the model is loaded."""
    if get_field(cfg, "mode") == "export":
        return
    reads_daar = get_field(cfg, "mode") == "daar" or get_field(cfg, "daar.use_for_ideal") is True
    named: list[tuple[str, Any]] = []
    for field in PATH_FIELDS:
        if field.startswith("data.") and get_field(cfg, "data.demo") is True:
            continue  # the demo suite is built into the workdir: these are not read
        if field.startswith("daar.") and not reads_daar:
            continue
        if field == "daar.seed_pairs" and (
            get_field(cfg, "daar.generator") != "file"
            or get_field(cfg, "daar.seed_pairs") == "demo"
        ):
            continue  # "demo": the demo suite's pairs, written into the workdir
        value = get_field(cfg, field)
        if hasattr(value, "items"):
            named += [(f"{field}.{key}", path) for key, path in value.items()]
        elif value is not MISSING:
            named.append((field, value))
    tasks = get_field(cfg, "eval.tasks")
    if hasattr(tasks, "items"):
        for name, task in tasks.items():
            if hasattr(task, "get"):
                named.append((f"eval.tasks.{name}.path", task.get("path")))
    for field, path in named:
        if isinstance(path, str) and path and not os.path.exists(path):
            raise InputError(f"no such file or directory: {path}", field=field)
