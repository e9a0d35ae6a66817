"""Multi-host start-up: one JAX distributed system over all hosts of a TPU pod or GPU cluster.

`maybe_initialize()` calls `jax.distributed.initialize()` when the process was launched as part of
a multi-process job, and does nothing on a single machine. It recognises, in this order:
  - explicit coordinator: IDEAL_JAX_COORDINATOR=host:port, IDEAL_JAX_NUM_PROCESSES and
    IDEAL_JAX_PROCESS_ID (local multi-process tests, any other launcher)
  - SLURM with SLURM_NTASKS > 1. One task per GPU: JAX's own SLURM detection (each process gets
    GPU SLURM_LOCALID). One task per node (or any task that should drive several GPUs): the
    coordinator (the job's first node, port 20000 + job id mod 20000), process count and id are
    read from SLURM here and passed explicitly with every local GPU, because JAX's detection
    would give each task a single GPU.
  - a TPU VM slice: TPU_WORKER_HOSTNAMES with more than one worker, or — when that variable is
    absent, as on a plain `gcloud ... tpu-vm ssh --worker=all` — the GCE metadata server's
    `worker-network-endpoints` (queried only on a machine with TPU devices, 1 s timeout) listing
    more than one worker; JAX then finds the coordinator itself.
  - IDEAL_JAX_DISTRIBUTED=1: anything else JAX can auto-detect.
"""

from __future__ import annotations

import glob
import os
import re
import urllib.request
from collections.abc import Callable

import jax

METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def _metadata(key: str) -> str | None:
    """A GCE instance attribute, or None off GCE (1 s timeout)."""
    request = urllib.request.Request(METADATA + key, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=1.0) as response:
            return response.read().decode()
    except OSError:
        return None


def _has_tpu_devices() -> bool:
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def tpu_worker_count(
    env: dict[str, str],
    metadata: Callable[[str], str | None] = _metadata,
    has_tpu: Callable[[], bool] = _has_tpu_devices,
) -> int:
    """Workers in this TPU slice: TPU_WORKER_HOSTNAMES, else the metadata server's endpoints
    (only asked on a machine with TPU devices); 1 when not on a multi-worker TPU slice."""
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if hosts:
        return len(hosts)
    if env.get("TPU_SKIP_MDS_QUERY") or not has_tpu():
        return 1
    endpoints = metadata("worker-network-endpoints") or ""
    return max(1, len([e for e in endpoints.split(",") if e.strip()]))


def slurm_tasks_per_node(env: dict[str, str]) -> int:
    """Tasks SLURM started on this node (SLURM_NTASKS_PER_NODE, else SLURM_TASKS_PER_NODE's
    first entry like "1(x4)", else tasks / nodes)."""
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        match = re.match(r"\s*(\d+)", env.get(key, ""))
        if match:
            return int(match.group(1))
    tasks, nodes = int(env.get("SLURM_NTASKS", "1") or 1), int(env.get("SLURM_NNODES", "1") or 1)
    return max(1, tasks // max(nodes, 1))


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" → "gpu07"."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_one_task_per_node_args(env: dict[str, str]) -> dict:
    """jax.distributed.initialize arguments for a one-task-per-node SLURM job."""
    port = int(env.get("IDEAL_JAX_COORDINATOR_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return {
        "coordinator_address": f"{first_slurm_host(env['SLURM_JOB_NODELIST'])}:{port}",
        "num_processes": int(env["SLURM_NTASKS"]),
        "process_id": int(env["SLURM_PROCID"]),
        "local_device_ids": None,  # every GPU this task sees
    }


def launched_multiprocess(
    env: dict[str, str] | None = None,
    metadata: Callable[[str], str | None] = _metadata,
    has_tpu: Callable[[], bool] = _has_tpu_devices,
) -> str | None:
    """Which launcher started a multi-process job ("explicit", "slurm", "slurm_per_node",
    "tpu", "auto"), or None for a single process."""
    env = os.environ if env is None else env
    if env.get("IDEAL_JAX_COORDINATOR"):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm_per_node" if slurm_tasks_per_node(env) == 1 else "slurm"
    if tpu_worker_count(env, metadata, has_tpu) > 1:
        return "tpu"
    if env.get("IDEAL_JAX_DISTRIBUTED") == "1":
        return "auto"
    return None


def maybe_initialize() -> str | None:
    kind = launched_multiprocess()
    if kind is None:
        return None
    if kind == "explicit":
        if os.environ.get("IDEAL_JAX_CPU_COLLECTIVES"):  # localhost CPU tests: gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["IDEAL_JAX_COORDINATOR"],
            num_processes=int(os.environ["IDEAL_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["IDEAL_JAX_PROCESS_ID"]),
        )
    elif kind == "slurm_per_node":
        jax.distributed.initialize(**slurm_one_task_per_node_args(os.environ))
    else:
        jax.distributed.initialize()
    return kind


def is_lead_host() -> bool:
    """Artifacts and logs are written once, by process 0."""
    return jax.process_index() == 0
