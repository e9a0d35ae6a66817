"""One run per workdir (issue 15 item 4) and workdir problems as exit 2: file, read-only, locked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from ideal_jax.configlib import workdir as workdir_guard
from ideal_jax.configlib.workdir import prepare_workdir
from ideal_jax.utils import workdir_lock
from ideal_jax.utils.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = (
    "import sys, time\nfrom ideal_jax.utils import workdir_lock\n"
    "workdir_lock.acquire(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(60)\n"
)


def _start_holder(workdir: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, workdir], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def _cli(workdir: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ideal_jax.main",
            "--config",
            "configs/tiny.py",
            "--workdir",
            workdir,
        ]
        + list(extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_second_process_is_refused_and_dead_holders_lock_is_taken_over(tmp_path):
    workdir = str(tmp_path / "run")
    holder = _start_holder(workdir)
    try:
        with pytest.raises(InputError) as e:
            workdir_lock.acquire(workdir)
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and workdir in msg
        info = json.loads((tmp_path / "run" / ".lock").read_text())
        assert info == {"pid": holder.pid, "host": socket.gethostname()}
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its record stays behind
        holder.wait()
    assert (tmp_path / "run" / ".lock").exists()  # stale record of a dead process
    with workdir_lock.hold(workdir):  # taken over: the kernel dropped the dead holder's flock
        with workdir_lock.hold(workdir):  # re-entrant within one process (seeds call run again)
            pass
        info = json.loads((tmp_path / "run" / ".lock").read_text())
        assert info["pid"] == os.getpid()
    assert not (tmp_path / "run" / ".lock").exists()  # released
    assert sorted(os.listdir(tmp_path / "run")) == []  # no temporary files left


def test_cli_on_a_locked_workdir_exits_2_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    holder = _start_holder(workdir)
    try:
        r = _cli(workdir)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"pid {holder.pid}" in line
    assert socket.gethostname() in line
    assert sorted(os.listdir(workdir)) == [".lock"]  # nothing of the refused run was written


def test_cli_workdir_that_is_a_file_exits_2(tmp_path):
    path = tmp_path / "not_a_dir"
    path.write_text("keep")
    r = _cli(str(path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "is a file, not a directory" in r.stderr.strip().splitlines()[-1]
    assert path.read_text() == "keep"


def test_resume_with_the_same_config_writes_nothing(tmp_path, monkeypatch):
    from configs import tiny

    cfg = tiny.get_config()
    workdir = str(tmp_path / "run")
    assert prepare_workdir(cfg, workdir) is False
    path = os.path.join(workdir, "config.json")
    before = os.stat(path)
    rewrite = lambda *a: pytest.fail("rewrote config")  # noqa: E731
    monkeypatch.setattr(workdir_guard, "write_json_atomic", rewrite)
    assert prepare_workdir(cfg, workdir) is True
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.fixture
def read_only(tmp_path):
    """A read-only bind mount of tmp_path/src at tmp_path/ro (root only; root ignores chmod)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount for a read-only bind mount")
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        yield src, ro
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(ro)]).returncode == 0:
                break
            time.sleep(0.1)


def test_read_only_workdir(read_only):
    """Fresh: exit 2 naming the file. Current config.json: locked and resumed, nothing written."""
    from configs import tiny

    src, ro = read_only
    r = _cli(str(ro))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: file ") and "read-only" in line.lower()
    # a workdir whose config.json is current: the lock works and prepare_workdir writes nothing
    cfg = tiny.get_config()
    prepare_workdir(cfg, str(src / "done"))
    with workdir_lock.hold(str(ro / "done")):
        assert prepare_workdir(cfg, str(ro / "done")) is True
    assert sorted(os.listdir(src / "done")) == ["config.json"]
