"""Reruns of an existing workdir (issue 27 items 3 and 7): fewer rounds than it holds is refused
naming `rounds`, before config.json or any output changes; an artifact edited since it was
written (its SHA-256 no longer the one provenance.json recorded) is refused, every such file
listed. In-process on hand-made workdirs; whole runs are in tests/test_user_data_cli.py."""

import json
import os

import pytest
from config_helpers import tiny_config

from ideal_jax import main, provenance
from ideal_jax.configlib.workdir import prepare_workdir
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError

INPUTS = {"config.seed": "abc", "data": "def"}


def _artifact(workdir, rel, obj):
    path = os.path.join(workdir, rel)
    write_json_atomic(path, obj)
    provenance.record(path, INPUTS)
    return path


def _finished(workdir, rounds: int):
    """A workdir as a finished run of `rounds` rounds leaves it (the files these checks read)."""
    prepare_workdir(tiny_config(rounds=rounds), str(workdir))
    for k in range(rounds + 1):
        _artifact(workdir, f"round_{k}/influence.json", {"matrix": [[1.0 + k, -2.0]]})
        _artifact(workdir, f"round_{k}/row.json", {"step": k < rounds, "row": {"round": k}})
    (workdir / "final_mixture.jsonl").write_text("{}\n")
    return workdir


@pytest.mark.parametrize("held, asked", [(1, 0), (2, 0), (2, 1), (3, 1)])
def test_fewer_rounds_than_the_workdir_holds_is_refused(tmp_path, held, asked):
    workdir = _finished(tmp_path / "run", held)
    before = {
        p: open(os.path.join(workdir, p), "rb").read()
        for p in ("config.json", "final_mixture.jsonl", f"round_{asked}/row.json")
    }
    with pytest.raises(InputError, match=f"already holds round_{held}") as info:
        main.run(tiny_config(rounds=asked), str(workdir))
    assert info.value.field == "rounds"
    for p, content in before.items():
        assert open(os.path.join(workdir, p), "rb").read() == content, p


def test_rounds_at_or_beyond_the_workdir_extent_pass_the_check(tmp_path):
    workdir = _finished(tmp_path / "run", 1)
    provenance.check_extent(str(workdir), 1)
    provenance.check_extent(str(workdir), 3)
    provenance.check_extent(str(tmp_path / "new"), 0)  # no workdir yet


def test_a_round_that_already_stepped_counts_as_past_the_extent(tmp_path):
    """round_1 stepped towards round 2 (its row says step) but round_2 was not written yet."""
    workdir = tmp_path / "run"
    _artifact(workdir, "round_0/row.json", {"step": True, "row": {}})
    _artifact(workdir, "round_1/row.json", {"step": True, "row": {}})
    with pytest.raises(InputError) as info:
        provenance.check_extent(str(workdir), 1)
    assert info.value.field == "rounds"


EDITS = {
    "alpha_negated": lambda d: {**d, "matrix": [[-x for x in row] for row in d["matrix"]]},
    "key_added": lambda d: {**d, "note": "edited"},
    "reformatted_only": lambda d: d,  # same values, other bytes: still not what was written
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_artifact_of_a_finished_workdir_is_refused(tmp_path, edit):
    """α negated in influence.json: the rerun exited 0 and said nothing before."""
    workdir = _finished(tmp_path / "run", 1)
    path = os.path.join(workdir, "round_0", "influence.json")
    with open(path) as f:
        edited = EDITS[edit](json.load(f))
    with open(path, "w") as f:
        json.dump(edited, f, separators=(",", ":"))
    content = open(path).read()
    with pytest.raises(InputError, match="round_0/influence.json was modified") as info:
        main.run(tiny_config(rounds=1), str(workdir))
    assert info.value.path == path
    assert open(path).read() == content  # left as it is


def test_every_modified_artifact_is_listed(tmp_path):
    workdir = _finished(tmp_path / "run", 2)
    for rel in ("round_0/influence.json", "round_2/row.json"):
        with open(os.path.join(workdir, rel), "a") as f:
            f.write(" ")
    assert provenance.modified_artifacts(str(workdir)) == [
        "round_0/influence.json",
        "round_2/row.json",
    ]
    with pytest.raises(InputError, match=r"2 artifacts \(round_0/influence.json, round_2/row"):
        provenance.check_unmodified(str(workdir))


def test_deleted_artifacts_and_unrecorded_files_are_not_mismatches(tmp_path):
    workdir = _finished(tmp_path / "run", 1)
    os.remove(os.path.join(workdir, "round_1", "influence.json"))  # asks for a recompute
    (workdir / "summary.json").write_text("{}")  # rewritten by every rerun, never recorded
    ckpt = workdir / "round_0" / "train" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "provenance.json").write_text("not json")  # not read: checkpoints hold no records
    assert provenance.modified_artifacts(str(workdir)) == []
    provenance.check_unmodified(str(workdir))
