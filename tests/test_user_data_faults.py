"""Faults of the machine (issue 27 item 4): a full disk and Ctrl-C end with one `error:` line and
exit 2 / 130 (main.report_error, the one place where exceptions become exit statuses); a bug
stays a traceback. The end-to-end runs (a real fault mid-run, then an exact resume) are in
tests/test_user_data_cli.py (integration)."""

import errno
import json
import os

import pytest
from config_helpers import tiny_config

from ideal_jax import main
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError, describe_machine_error

# What orbax raised when the disk filled during a checkpoint (measured on a 2 MiB tmpfs).
ORBAX_NO_SPACE = (
    'RESOURCE_EXHAUSTED: Error writing "params.lm_head.kernel/0.0" in OCDBT database at local '
    'file "/w/round_0/train/checkpoints/8.orbax-checkpoint-tmp/state/ocdbt.process_0/": Failed '
    'writing: "/w/round_0/train/checkpoints/8.orbax-checkpoint-tmp/state/ocdbt.process_0/d/7270": '
    "Failed to write 16550 bytes to file 18: No space left on device [os_error_code='28']"
)
XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."


def _chained(outer: Exception, inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer from e
    except Exception as e:
        return e


DISK_FULL = {
    "oserror_enospc": OSError(errno.ENOSPC, "No space left on device", "/w/round_0/eval.json"),
    "oserror_edquot": OSError(errno.EDQUOT, "Disk quota exceeded", "/w/summary.json"),
    "oserror_no_filename": OSError(errno.ENOSPC, "No space left on device"),
    "orbax_value_error": ValueError(ORBAX_NO_SPACE),
    "orbax_chained": _chained(RuntimeError("save failed"), ValueError(ORBAX_NO_SPACE)),
    "enospc_under_runtime_error": _chained(
        RuntimeError("writer thread died"), OSError(errno.ENOSPC, "No space left on device", "/w/x")
    ),
}
BUGS = {
    "value_error": ValueError("shapes (3,) and (4,) do not match"),
    "xla_out_of_memory": RuntimeError(XLA_OOM),
    "key_error": KeyError("alpha"),
    "enoent": FileNotFoundError(errno.ENOENT, "No such file or directory", "/w/x"),
}


@pytest.mark.parametrize("case", sorted(DISK_FULL))
def test_a_full_disk_is_one_line_naming_the_path(case):
    status, message = main.report_error(DISK_FULL[case], "/w")
    assert status == 2 and "\n" not in message
    assert "no space left" in message and "rerun the same command" in message
    assert "file /w" in message, message


def test_the_failed_write_size_is_named_when_known():
    _, message = main.report_error(ValueError(ORBAX_NO_SPACE), "/w")
    assert "file /w/round_0/train/checkpoints/8.orbax-checkpoint-tmp/state/" in message
    assert "a write of 16.2 KiB failed" in message


@pytest.mark.parametrize("case", sorted(BUGS))
def test_a_bug_stays_a_traceback(case):
    assert main.report_error(BUGS[case], "/w") is None
    assert describe_machine_error(BUGS[case], "/w") is None


def test_ctrl_c_is_130_and_input_errors_anywhere_in_the_chain_are_2():
    assert main.report_error(KeyboardInterrupt(), "/w")[0] == main.INTERRUPTED == 130
    assert main.report_error(SystemExit(3), "/w") is None
    wrapped = _chained(RuntimeError("stage failed"), InputError("bad", path="/d.jsonl"))
    assert main.report_error(wrapped, "/w") == (2, "file /d.jsonl: bad")


def _command(monkeypatch, capsys, raised: BaseException):
    def run(cfg, workdir):
        raise raised

    monkeypatch.setattr(main, "run", run)
    exits = []

    def hard_exit(status):
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(main, "_hard_exit", hard_exit)
    try:
        main.command(tiny_config(), "/w")
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:  # not pytest's own: it would stop the session, not fail the test
        pytest.fail("Ctrl-C escaped main.command")
    else:
        pytest.fail("main.command returned after an error")
    err = capsys.readouterr().err.strip().splitlines()
    return code, exits, err


@pytest.mark.parametrize(
    "raised, status, hard",
    [
        (ValueError(ORBAX_NO_SPACE), 2, True),
        (KeyboardInterrupt(), 130, True),
        (InputError("bad", field="train.epochs"), 2, False),
    ],
    ids=["disk_full", "ctrl_c", "input_error"],
)
def test_command_ends_with_one_error_line(monkeypatch, capsys, raised, status, hard):
    code, exits, err = _command(monkeypatch, capsys, raised)
    assert code == status and exits == ([status] if hard else [])
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_command_lets_a_bug_through(monkeypatch, capsys):
    monkeypatch.setattr(main, "run", lambda cfg, workdir: [][1])
    with pytest.raises(IndexError):
        main.command(tiny_config(), "/w")


def test_a_full_disk_during_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "summary.json")
    write_json_atomic(path, {"v": 1})
    real_dump = json.dump

    def dump_then_fill(obj, f, **kw):
        f.write("{partial")
        raise OSError(errno.ENOSPC, "No space left on device", f.name)

    monkeypatch.setattr(json, "dump", dump_then_fill)
    with pytest.raises(OSError) as info:
        write_json_atomic(path, {"v": 2})
    monkeypatch.setattr(json, "dump", real_dump)
    assert json.load(open(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["summary.json"]  # no partial .tmp file left behind
    status, message = main.report_error(info.value, str(tmp_path))
    assert status == 2 and str(tmp_path) in message
