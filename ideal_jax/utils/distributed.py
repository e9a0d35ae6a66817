"""Multi-host start-up: one JAX distributed system over all hosts of a TPU pod or GPU cluster.

`maybe_initialize()` calls `jax.distributed.initialize()` when the process was launched as part of
a multi-process job, and does nothing on a single machine:
  - explicit coordinator: IDEAL_JAX_COORDINATOR=host:port, IDEAL_JAX_NUM_PROCESSES and
    IDEAL_JAX_PROCESS_ID
  - SLURM: SLURM_NTASKS > 1 (jax reads the coordinator from the SLURM environment)
  - TPU pods: TPU_WORKER_HOSTNAMES lists more than one worker (jax detects the slice itself)
  - anything else jax can auto-detect (e.g. a GCE TPU VM slice): IDEAL_JAX_DISTRIBUTED=1
"""

from __future__ import annotations

import os

import jax


def launched_multiprocess(env: dict[str, str] | None = None) -> str | None:
    """Which launcher started a multi-process job, or None for a single process."""
    env = os.environ if env is None else env
    if env.get("IDEAL_JAX_COORDINATOR"):
        return "explicit"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
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
    else:
        jax.distributed.initialize()
    return kind


def is_lead_host() -> bool:
    """Artifacts and logs are written once, by process 0."""
    return jax.process_index() == 0
