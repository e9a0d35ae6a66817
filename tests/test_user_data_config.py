"""Config values are checked before the workdir exists (issue 27 item 2): ranges, cross-field
limits, the mesh and the batch against this machine's devices, the paths the config names.
Every hostile value (tests/hostile_data.py) is an InputError naming its field, nothing written."""

import os

import jax
import pytest
from config_helpers import set_fields, tiny_config
from hostile_data import BAD_CONFIG_VALUES, batch_geometry_cases, mesh_cases

from ideal_jax import main
from ideal_jax.configlib.fields import flat_fields
from ideal_jax.configlib.machine import check_machine, check_paths
from ideal_jax.utils.errors import InputError

DEVICES = jax.device_count()


def _refused(changes: dict, field: str, tmp_path, *text: str) -> str:
    """main.check_config's InputError (what main.run calls first: see the test below)."""
    with pytest.raises(InputError) as info:
        main.check_config(tiny_config(**changes))
    assert info.value.field == field, str(info.value)
    for t in text:
        assert t in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "changes",
    [{"train.learning_rate": -1e-3}, {"mesh.data": DEVICES + 1}, {"train.batch_size": 3}],
    ids=["negative_lr", "mesh", "batch"],
)
def test_run_checks_the_config_before_the_workdir_exists(tmp_path, changes):
    workdir = str(tmp_path / "run")
    with pytest.raises(InputError):
        main.run(tiny_config(**changes), workdir)
    assert not os.path.exists(workdir)


@pytest.mark.parametrize(
    "field, value", BAD_CONFIG_VALUES, ids=[f"{f}={v}" for f, v in BAD_CONFIG_VALUES]
)
def test_out_of_range_value_is_refused_before_the_workdir(tmp_path, field, value):
    _refused({field: value}, field, tmp_path, "must be")


def test_every_generated_field_exists_in_the_tiny_config():
    flat = flat_fields(tiny_config())
    assert {f for f, _ in BAD_CONFIG_VALUES} <= set(flat)


MESHES = mesh_cases(DEVICES)


@pytest.mark.parametrize("changes, field", MESHES, ids=[str(c) for c, _ in MESHES])
def test_mesh_that_does_not_fit_the_devices_is_refused(tmp_path, changes, field):
    """--config.mesh.data=4 on 8 devices failed with a traceback after config.json was written,
    and the corrected rerun was then refused ("differing fields: mesh.data")."""
    _refused(changes, field, tmp_path, "mesh")


def test_the_message_says_how_many_devices_there_are(tmp_path):
    message = _refused({"mesh.data": DEVICES + 1}, "mesh.data", tmp_path)
    assert f"needs {DEVICES + 1} devices, this machine has {DEVICES}" in message


BATCHES = batch_geometry_cases(DEVICES)


@pytest.mark.parametrize("changes, field", BATCHES, ids=[str(c) for c, _ in BATCHES])
def test_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path, changes, field):
    _refused(changes, field, tmp_path, "grad_accum")


def test_export_mode_does_not_check_the_mesh():
    cfg = tiny_config(mode="export", **{"mesh.data": DEVICES + 1})
    check_machine(cfg, DEVICES)  # export reads the run's own config; no mesh


def test_a_mesh_that_fits_passes():
    for shape in ({"mesh.data": -1}, {"mesh.data": DEVICES}, {"mesh.data": 1, "mesh.fsdp": -1}):
        check_machine(tiny_config(**shape), DEVICES)


def test_max_len_longer_than_a_training_row_is_refused(tmp_path):
    _refused({"data.max_len": 128, "train.seq_len": 64}, "data.max_len", tmp_path, "seq_len")


def _own_data_config(tmp_path, **changes):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "response": "a"}\n')
    cfg = tiny_config(
        **{
            "data.demo": False,
            "eval.demo": False,
            "data.reference_source": str(data),
            "data.tokenizer": str(tmp_path),
        }
    )
    cfg.unlock()
    cfg.data.domains = {"math": str(data)}
    cfg.eval.tasks = {"mmlu": {"type": "multiple_choice", "path": str(data)}}
    return set_fields(cfg, changes)


@pytest.mark.parametrize(
    "field, change",
    [
        ("data.domains.math", {"data.domains.math": "/nonexistent/math.jsonl"}),
        ("data.reference_source", {"data.reference_source": "/nonexistent/ref.jsonl"}),
        ("data.tokenizer", {"data.tokenizer": "/nonexistent/tok"}),
        ("model.path", {"model.path": "/nonexistent/model"}),
        ("eval.tasks.mmlu.path", {"eval.tasks.mmlu.path": "/nonexistent/mmlu.jsonl"}),
        ("daar.pool", {"mode": "daar", "daar.pool": "/nonexistent/pool.jsonl"}),
    ],
)
def test_missing_path_is_refused_before_the_workdir(tmp_path, field, change):
    cfg = _own_data_config(tmp_path, **change)
    workdir = str(tmp_path / "run")
    with pytest.raises(InputError, match="no such file or directory: /nonexistent") as info:
        main.check_config(cfg)
    assert info.value.field == field
    with pytest.raises(InputError):
        main.run(cfg, workdir)
    assert not os.path.exists(workdir)


def test_paths_of_a_demo_run_are_not_checked(tmp_path):
    cfg = tiny_config()
    cfg.unlock()
    cfg.data.domains = {"ignored": "/nonexistent"}  # the demo suite replaces them
    check_paths(cfg)
    check_paths(_own_data_config(tmp_path))  # every path exists
