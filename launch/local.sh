#!/usr/bin/env bash
# Run ideal_jax on this machine.
#
#   launch/local.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   NUM_PROCESSES=2 launch/local.sh CONFIG WORKDIR ...     # N local processes, one JAX system
#
# One process (the default) uses every local device: CPU, or all GPUs of the node. NUM_PROCESSES>1
# starts that many processes on localhost forming one JAX distributed system over the explicit
# coordinator variables that ideal_jax.utils.distributed reads, with CPU collectives through gloo:
# a rehearsal of a multi-host run without a cluster (each process reads its share of the data).
# Process 0's output goes to the terminal, the others' to $LOG_DIR/process_<i>.log.
#
# Environment: PYTHON (default python), NUM_PROCESSES (1), COORDINATOR_PORT (12355),
# LOCAL_DEVICES (fake CPU devices per process, multi-process only; default 1), LOG_DIR.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
CONFIG=$1
WORKDIR=$2
shift 2
PYTHON=${PYTHON:-python}
NUM_PROCESSES=${NUM_PROCESSES:-1}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The checkout is importable without `pip install -e .`.
export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"

if [[ "${NUM_PROCESSES}" -le 1 ]]; then
  exec "${PYTHON}" -m ideal_jax.main --config "${CONFIG}" --workdir "${WORKDIR}" "$@"
fi

LOG_DIR=${LOG_DIR:-${TMPDIR:-/tmp}/ideal_jax_logs}
mkdir -p "${LOG_DIR}"
export IDEAL_JAX_COORDINATOR="localhost:${COORDINATOR_PORT:-12355}"
export IDEAL_JAX_NUM_PROCESSES="${NUM_PROCESSES}"
export IDEAL_JAX_CPU_COLLECTIVES=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export XLA_FLAGS="--xla_force_host_platform_device_count=${LOCAL_DEVICES:-1} ${XLA_FLAGS:-}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  if [[ $i -eq 0 ]]; then
    IDEAL_JAX_PROCESS_ID=$i "${PYTHON}" -m ideal_jax.main --config "${CONFIG}" \
      --workdir "${WORKDIR}" "$@" &
  else
    IDEAL_JAX_PROCESS_ID=$i "${PYTHON}" -m ideal_jax.main --config "${CONFIG}" \
      --workdir "${WORKDIR}" "$@" >"${LOG_DIR}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done
# Fail fast: the first process to fail stops the others (they would wait on it forever).
status=0
for ((n = 0; n < NUM_PROCESSES; n++)); do
  if ! wait -n; then
    status=1
    echo "a process failed; logs of processes 1..$((NUM_PROCESSES - 1)) in ${LOG_DIR}" >&2
    break
  fi
done
exit "${status}"
