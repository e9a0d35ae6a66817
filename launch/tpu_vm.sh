#!/usr/bin/env bash
# Cloud TPU VM slices (single host or pod slice): create, install, run on every worker, delete.
#
#   launch/tpu_vm.sh create                      # gcloud compute tpus tpu-vm create
#   launch/tpu_vm.sh setup                       # copy this checkout to all workers, pip install
#   launch/tpu_vm.sh run CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   launch/tpu_vm.sh ssh 'COMMAND'               # any command on all workers
#   launch/tpu_vm.sh delete
#
# `run` starts the same `python -m ideal_jax.main --config CONFIG --workdir WORKDIR` on every worker
# (gcloud ... ssh --worker=all). It sets TPU_WORKER_HOSTNAMES (the slice's worker addresses, in
# worker order) and TPU_WORKER_ID (from the worker's metadata server) so that
# ideal_jax.utils.distributed calls jax.distributed.initialize() on multi-host slices. WORKDIR must
# be storage every worker sees at the same path (a gcsfuse bucket mount or NFS / Filestore):
# checkpoints are written cooperatively by all workers, artifacts by worker 0 only.
#
# Environment: TPU_NAME (required), ZONE (required), PROJECT, ACCELERATOR_TYPE (v5p-16),
# RUNTIME_VERSION (v2-alpha-tpuv5), REMOTE_DIR (ideal_jax, relative to the remote home),
# REMOTE_PYTHON (python3), JAX_PIP_SPEC ("jax[tpu]"), EXTRA_ENV (e.g. "HF_HOME=/mnt/hf").
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5}
REMOTE_DIR=${REMOTE_DIR:-ideal_jax}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3}
JAX_PIP_SPEC=${JAX_PIP_SPEC:-jax[tpu]}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD_ARGS=(--zone "${ZONE}")
[[ -n "${PROJECT:-}" ]] && GCLOUD_ARGS+=(--project "${PROJECT}")

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_ARGS[@]}" --worker=all --command "$1"
}

command=$1
shift
case "${command}" in
  create)
    gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_ARGS[@]}" \
      --accelerator-type "${ACCELERATOR_TYPE}" --version "${RUNTIME_VERSION}"
    ;;
  setup)
    archive=$(mktemp "${TMPDIR:-/tmp}/ideal_jax_src.XXXXXX.tgz")
    tar -C "${REPO}" --exclude-vcs --exclude=__pycache__ --exclude='*.pyc' -czf "${archive}" .
    gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:/tmp/ideal_jax_src.tgz" \
      "${GCLOUD_ARGS[@]}" --worker=all
    rm -f "${archive}"
    on_all_workers "mkdir -p ${REMOTE_DIR} && tar -xzf /tmp/ideal_jax_src.tgz -C ${REMOTE_DIR} \
      && cd ${REMOTE_DIR} && ${REMOTE_PYTHON} -m pip install -U '${JAX_PIP_SPEC}' \
      && ${REMOTE_PYTHON} -m pip install -e ."
    ;;
  run)
    [[ $# -ge 2 ]] || usage
    config=$1
    workdir=$2
    shift 2
    # Multi-host start-up needs no variables here: ideal_jax.utils.distributed finds the slice's
    # workers from the TPU VM's metadata server.
    extra=$(printf '%q ' "$@")
    on_all_workers "cd ${REMOTE_DIR} ${EXTRA_ENV:+&& export ${EXTRA_ENV}} && ${REMOTE_PYTHON} \
      -m ideal_jax.main --config $(printf '%q' "${config}") \
      --workdir $(printf '%q' "${workdir}") ${extra}"
    ;;
  ssh)
    [[ $# -ge 1 ]] || usage
    on_all_workers "$1"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_ARGS[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
