"""Log lines at the start and end of every stage (with its duration) and progress bars labelled
with the round (ideal_jax/utils/progress.py, artifacts.Timer); off a terminal, plain progress
lines at most every LOG_EVERY_S seconds instead of bars."""

import io
import logging as std_logging
import os
import re

import pytest
from absl import logging
from tqdm.auto import tqdm

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


class _Clock:
    """A fake clock for LineProgress: time moves only when the test says."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(progress, "_clock", fake)
    return fake


def _lines(stream):
    text = stream.getvalue()
    assert text.endswith("\n") or not text, repr(text)
    return text.splitlines()


def test_off_a_terminal_progress_is_a_line_at_most_every_n_seconds(clock):
    out = io.StringIO()
    with progress.stage("round 1 influence"):
        bar = progress.bar(range(100), "curvature factors", file=out, log_every=30)
        assert isinstance(bar, progress.LineProgress)
        for _ in bar:
            clock.t += 1.0  # 1 s per batch: 100 s in all
    text = out.getvalue()
    assert "\r" not in text
    lines = _lines(out)
    # at 30, 60 and 90 s, and the final line: at most elapsed / N + 1
    assert len(lines) == 4 <= 100 // 30 + 1, lines
    assert lines[0] == (
        "round 1 influence: curvature factors: 30/100 batch (30%), 1 batch/s, elapsed 00:30, "
        "ETA 01:10"
    )
    assert all(line.startswith("round 1 influence: curvature factors: ") for line in lines)
    assert "done, 100/100 batch (100%)" in lines[-1] and "elapsed 01:40" in lines[-1]
    assert "ETA" not in lines[-1]


def test_the_interval_defaults_to_the_module_constant(clock):
    assert 10 <= progress.LOG_EVERY_S <= 120  # a sensible log cadence
    out = io.StringIO()
    bar = progress.bar(total=1000, desc="tokenize", unit="ex", file=out)
    assert bar.log_every == progress.LOG_EVERY_S
    for _ in range(1000):  # 0.01 s per update for 10 s: no line until the end...
        clock.t += 0.01
        bar.update(1)
    assert out.getvalue() == ""
    clock.t += progress.LOG_EVERY_S  # ...one once an interval has passed...
    bar.update(0)
    bar.close()  # ...and the final one
    lines = _lines(out)
    assert len(lines) == 2 and lines[-1].startswith("tokenize: done, 1000/1000 ex"), lines


def test_a_bar_closed_before_its_total_says_stopped_with_postfix_and_slow_rates(clock):
    out = io.StringIO()
    bar = progress.bar(total=10, desc="steps", unit="step", initial=2, file=out, log_every=30)
    bar.set_postfix(loss="2.3050", tok_s="1.2e+03")
    for _ in range(3):
        clock.t += 100.0  # 100 s per step: a rate below 1/s reads as seconds per step
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing
    lines = _lines(out)
    assert lines[0] == (
        "steps: 3/10 step (30%), 100 s/step, elapsed 01:40, ETA 11:40 [loss=2.3050, tok_s=1.2e+03]"
    )
    assert len(lines) == 4 and lines[-1].startswith("steps: stopped, 5/10 step (50%)"), lines
    assert "\r" not in out.getvalue()


def test_a_line_bar_without_total_counts_and_ends_done(clock):
    out = io.StringIO()
    bar = progress.bar(iter(range(5)), "stream", file=out, log_every=30)
    assert list(bar) == [0, 1, 2, 3, 4] and bar.total is None
    assert _lines(out) == ["stream: done, 5 batch, elapsed 00:00"]


def test_on_a_terminal_the_bar_is_tqdm_as_before(clock):
    term = _Terminal()
    with progress.stage("round 2 influence"):
        bar = progress.bar(range(5), "curvature factors", file=term)
        assert isinstance(bar, tqdm) and not isinstance(bar, progress.LineProgress)
        assert bar.desc == "round 2 influence: curvature factors" and bar.leave is False
        assert sum(bar) == 10
    assert "\r" in term.getvalue()  # redrawn in place
    assert "round 2 influence: curvature factors" in term.getvalue()


def test_disabled_bars_write_nothing_on_either_stream():
    for stream in (io.StringIO(), _Terminal()):
        progress.configure(enabled=False)
        bar = progress.bar(range(3), "x", file=stream)
        assert bar.disable and sum(bar) == 3
        assert progress.bar(range(3), "x", file=stream, disable=True).disable
        progress.configure(enabled=True)
        assert progress.bar(range(3), "x", file=stream, disable=True).disable
        assert stream.getvalue() == ""


def test_a_stream_without_isatty_or_closed_counts_as_no_terminal():
    class Bare:
        def write(self, s):
            pass

        def flush(self):
            pass

    assert not progress._is_terminal(Bare())
    closed = io.StringIO()
    closed.close()
    assert not progress._is_terminal(closed)


def test_the_eval_runner_reports_in_lines_off_a_terminal(capsys):
    """A caller end to end: evaluate_tasks' bars (stderr, not a terminal under pytest)."""
    from ideal_jax.evaluate import evaluate_tasks

    records = [{"prompt": "2+2=", "answer": "4", "capability": "math"}]
    task = {"type": "exact_match", "name": "demo", "records": records}
    generate = lambda prompts, max_new_tokens, temperature, n: [["4"] * n for _ in prompts]
    with progress.stage("round 0 eval"):
        evaluate_tasks([task], generate, None, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "round 0 eval: demo: done, 1/1 it" in err
    assert "round 0 eval: eval tasks: done, 1/1 it" in err
