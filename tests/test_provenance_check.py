"""provenance.check / reuse on one artifact: the recorded inputs and the content digest both
guard reuse (apart from the whole-workdir check a rerun makes first, check_unmodified)."""

import json

import pytest

from ideal_jax import provenance
from ideal_jax.utils.errors import InputError


def _artifact(tmp_path, content=None):
    path = tmp_path / "influence.json"
    path.write_text(json.dumps(content or {"alpha": [0.25, -0.5]}))
    provenance.record(str(path), {"config": "abc", "mixture": "123"})
    return str(path)


def test_an_unchanged_artifact_with_the_same_inputs_is_reused(tmp_path):
    path = _artifact(tmp_path)
    assert provenance.reuse(path, {"config": "abc", "mixture": "123"})
    assert not provenance.reuse(str(tmp_path / "absent.json"), {})


def test_a_hand_edited_artifact_is_not_trusted(tmp_path):
    path = _artifact(tmp_path)
    with open(path, "w") as f:
        json.dump({"alpha": [-0.25, 0.5]}, f)  # α negated by hand
    with pytest.raises(InputError, match="modified after it was written"):
        provenance.reuse(path, {"config": "abc", "mixture": "123"})


def test_an_artifact_from_other_inputs_names_what_changed(tmp_path):
    path = _artifact(tmp_path)
    with pytest.raises(InputError) as e:
        provenance.check(path, {"config": "abc", "mixture": "999"})
    assert e.value.field == "mixture"
