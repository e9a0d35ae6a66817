"""A newer package with more config fields must not invalidate finished runs: each stage's
artifacts are fingerprinted over the config sections that stage reads (provenance.stage_inputs),
and a field the stored config.json lacks counts as unchanged when it has its default value."""

import json
import os

import pytest
from config_helpers import tiny_config

from ideal_jax import main, provenance
from ideal_jax.configlib.fields import to_json
from ideal_jax.configlib.workdir import prepare_workdir
from ideal_jax.utils.errors import InputError


def _cfg(**changes):
    return tiny_config(**changes)


def _prepare(cfg, workdir: str) -> bool:
    """The workdir guard as the command line runs it (with configs/common.py's defaults)."""
    return prepare_workdir(cfg, workdir, defaults=main.default_fields())


def test_stage_fingerprints_cover_exactly_the_sections_the_stage_reads():
    base = {s: provenance.stage_inputs(_cfg(), s, "d") for s in provenance.STAGE_SECTIONS}
    # a DaaR knob changes only DaaR's artifacts
    daar = {s: provenance.stage_inputs(_cfg(**{"daar.probe_lr": 0.5}), s, "d") for s in base}
    assert [s for s in base if base[s] != daar[s]] == ["daar"]
    # the damping changes the influence and the step, not training, evaluation or mixtures
    damp = {s: provenance.stage_inputs(_cfg(**{"curvature.damping": 0.5}), s, "d") for s in base}
    assert sorted(s for s in base if base[s] != damp[s]) == ["influence", "reweight"]
    changed = [k for k in base["influence"] if base["influence"][k] != damp["influence"][k]]
    assert changed == ["config.curvature"]  # the message names the section that changed
    # the learning rate changes everything downstream of training
    lr = {s: provenance.stage_inputs(_cfg(**{"train.learning_rate": 0.5}), s, "d") for s in base}
    assert sorted(s for s in base if base[s] != lr[s]) == [
        "compare",
        "eval",
        "influence",
        "reweight",
        "train",
    ]
    # fields that never change results (logging cadence) change no fingerprint
    log = {s: provenance.stage_inputs(_cfg(**{"train.log_every": 7}), s, "d") for s in base}
    assert log == base


def _stored(tmp_path, cfg, drop=()):
    workdir = str(tmp_path / "w")
    _prepare(cfg, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        stored = json.load(f)
    for dotted in drop:  # as written by an older version that did not have these fields
        *parents, leaf = dotted.split(".")
        node = stored
        for name in parents:
            node = node[name]
        del node[leaf]
    with open(path, "w") as f:
        json.dump(stored, f)
    return workdir


def test_a_field_added_later_at_its_default_does_not_refuse_the_workdir(tmp_path):
    workdir = _stored(tmp_path, _cfg(), drop=("daar.feature_norm", "compare.doremi_eta"))
    assert _prepare(_cfg(), workdir) is True  # resumes
    with open(os.path.join(workdir, "config.json")) as f:
        assert "feature_norm" in json.load(f)["daar"]  # the stored config is completed


def test_a_field_added_later_at_another_value_is_refused(tmp_path):
    workdir = _stored(tmp_path, _cfg(), drop=("compare.doremi_eta",))
    with pytest.raises(InputError, match="compare.doremi_eta"):
        _prepare(_cfg(**{"compare.doremi_eta": 3.0}), workdir)


def test_a_changed_field_that_the_stored_config_has_is_still_refused(tmp_path):
    workdir = _stored(tmp_path, _cfg())
    with pytest.raises(InputError, match="curvature.damping"):
        _prepare(_cfg(**{"curvature.damping": 0.5}), workdir)


def test_fields_added_later_leave_an_older_workdirs_stage_fingerprints_unchanged():
    """A workdir written before a section gained fields (train.finetuning and its knobs): its
    config lacks them, and at the values that do what it did every stage fingerprint is the
    one it recorded, so its finished stages are reused; another value is another input."""
    cfg = _cfg()
    older = json.loads(to_json(cfg))
    for dotted in provenance.ADDED_FIELDS:
        section, leaf = dotted.split(".")
        del older[section][leaf]
    for stage in provenance.STAGE_SECTIONS:
        assert provenance.stage_inputs(older, stage, "d") == provenance.stage_inputs(
            cfg, stage, "d"
        )
    freeze = _cfg(**{"train.finetuning": "freeze"})
    assert provenance.stage_inputs(freeze, "train", "d") != provenance.stage_inputs(
        cfg, "train", "d"
    )
