"""Log lines at the start and end of every stage (with its duration) and progress bars labelled
with the round (ideal_jax/utils/progress.py, artifacts.Timer)."""

import logging as std_logging
import os
import re

import pytest
from absl import logging

from ideal_jax import artifacts
from ideal_jax.data import suite as suite_lib
from ideal_jax.utils import progress


@pytest.fixture(autouse=True)
def _bars_on():
    """Bars on whatever an earlier test left (main.run sets the process-wide setting)."""
    progress.configure(enabled=True)
    yield
    progress.configure(enabled=True)


@pytest.fixture
def absl_info(caplog):
    logging.set_verbosity(logging.INFO)
    caplog.set_level(std_logging.INFO, logger="absl")
    yield caplog
    logging.set_verbosity(logging.WARNING)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_timer_logs_start_end_and_labels_bars_with_the_round(tmp_path, absl_info):
    labels = []

    def fake_stage(n):
        bar = progress.bar(range(n), "curvature factors")
        labels.append(bar.desc)
        return sum(bar)

    timer = artifacts.Timer(str(tmp_path / "round_2" / "timings.json"))
    assert timer.run("influence", fake_stage, 4) == 6
    assert labels == ["round 2 influence: curvature factors"]
    lines = _messages(absl_info)
    assert lines[0] == "round 2 influence: start"
    assert re.fullmatch(r"round 2 influence: done in \d+\.\d s", lines[1]), lines
    assert progress.label() == ""  # the label ends with the stage
    assert "influence" in artifacts.read_json(timer.path)


def test_failed_stage_is_logged_and_reraised(tmp_path, absl_info):
    def broken():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        artifacts.Timer(str(tmp_path / "round_0" / "timings.json")).run("train", broken)
    assert re.fullmatch(r"round 0 train: failed in \d+\.\d s", _messages(absl_info)[-1])


def test_bars_follow_the_progress_setting():
    try:
        progress.configure(enabled=False)
        assert progress.bar(range(2), "x").disable
        progress.configure(enabled=True)
        assert not progress.bar(range(2), "x").disable
    finally:
        progress.configure(enabled=True)


def test_only_ideal_jax_info_lines_pass_the_filter():
    keep = progress._OwnInfoOnly()
    ours = os.path.join(os.path.dirname(progress.__file__), "x.py")
    record = lambda level, path: std_logging.LogRecord("absl", level, path, 1, "m", (), None)
    assert keep.filter(record(std_logging.INFO, ours))
    assert not keep.filter(record(std_logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
    assert keep.filter(record(std_logging.WARNING, "/site-packages/orbax/checkpoint/x.py"))


def test_load_suite_logs_and_labels_tokenising(tmp_path, absl_info, capsys):
    from configs import tiny

    suite_lib.load_suite(tiny.get_config(), str(tmp_path))
    lines = _messages(absl_info)
    assert lines[0] == "load data: start" and lines[-1].startswith("load data: done in")
    assert "load data: tokenize" in capsys.readouterr().err
