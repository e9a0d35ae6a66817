"""Multi-host detection (ideal_jax/utils/distributed.py) from the environments launchers create,
without the launch scripts' workarounds: SLURM one task per node, TPU VM slices without
TPU_WORKER_HOSTNAMES (metadata server faked)."""

import pytest

from ideal_jax.utils import distributed as d

NO_TPU = dict(metadata=lambda key: pytest.fail("metadata asked off TPU"), has_tpu=lambda: False)


def test_single_machine_is_not_multiprocess():
    assert d.launched_multiprocess({}, **NO_TPU) is None
    assert d.launched_multiprocess({"SLURM_NTASKS": "1", "SLURM_NNODES": "1"}, **NO_TPU) is None


def test_explicit_coordinator_wins():
    env = {"IDEAL_JAX_COORDINATOR": "h:1", "SLURM_NTASKS": "8"}
    assert d.launched_multiprocess(env, **NO_TPU) == "explicit"


def test_slurm_one_task_per_gpu_uses_jax_detection():
    env = {"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"}
    assert d.launched_multiprocess(env, **NO_TPU) == "slurm"


@pytest.mark.parametrize(
    "extra",
    [
        {"SLURM_NTASKS_PER_NODE": "1"},
        {"SLURM_TASKS_PER_NODE": "1(x4)"},
        {},  # only tasks and nodes: 4 / 4
    ],
)
def test_slurm_one_task_per_node_gets_every_gpu_and_an_explicit_coordinator(extra):
    env = {
        "SLURM_NTASKS": "4",
        "SLURM_NNODES": "4",
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[07-09,12]",
        **extra,
    }
    assert d.launched_multiprocess(env, **NO_TPU) == "slurm_per_node"
    assert d.slurm_one_task_per_node_args(env) == {
        "coordinator_address": "gpu07:23456",
        "num_processes": 4,
        "process_id": 2,
        "local_device_ids": None,
    }


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu[07-09,12]", "gpu07"), ("node1,node2", "node1"), ("a-b[3]", "a-b3"), ("solo", "solo")],
)
def test_first_slurm_host(nodelist, first):
    assert d.first_slurm_host(nodelist) == first


def test_tpu_slice_found_from_the_metadata_server_without_hostnames():
    asked = []

    def metadata(key):
        asked.append(key)
        return "uid0:10.0.0.1:x,uid1:10.0.0.2:x,uid2:10.0.0.3:x,uid3:10.0.0.4:x"

    assert d.launched_multiprocess({}, metadata=metadata, has_tpu=lambda: True) == "tpu"
    assert asked == ["worker-network-endpoints"]
    assert d.tpu_worker_count({}, metadata=metadata, has_tpu=lambda: True) == 4


def test_single_host_tpu_vm_is_not_multiprocess():
    one = dict(metadata=lambda key: "uid0:10.0.0.1:x", has_tpu=lambda: True)
    assert d.launched_multiprocess({}, **one) is None
    off_gce = dict(metadata=lambda key: None, has_tpu=lambda: True)
    assert d.launched_multiprocess({}, **off_gce) is None


def test_tpu_hostnames_still_work_and_skip_the_metadata_server():
    env = {"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}
    assert d.launched_multiprocess(env, **NO_TPU) == "tpu"
