"""The bubblewrap code sandbox contains each escape that beat the in-process guard (issue 15).

Every hostile program below *passes* only if its escape worked, so "not passed" plus the host-side
checks (files, modes, connections, processes, environment) are the containment criterion. Targets
are both a host directory the sandbox cannot see (``hidden``) and one it sees read-only (``shown``,
inside the evaluator's virtual environment, which the sandbox binds). docs/sandbox.md has the table.
The same programs, run with sandbox="inprocess", reproduce the escapes of the old guard
(tests/sandbox_escape_report.py prints that comparison; it is not part of the suite).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time

import pytest

from ideal_jax.evaluate import code_exec
from ideal_jax.evaluate import sandbox as sandbox_lib
from ideal_jax.utils.errors import InputError

LIMITS = sandbox_lib.SandboxLimits(timeout_s=5.0, memory_bytes=512 << 20, fsize_bytes=1 << 20)
# Processes allowed, so the shell-based escapes really run and containment is the namespaces' doing.
FORKING = sandbox_lib.SandboxLimits(
    timeout_s=5.0, memory_bytes=512 << 20, fsize_bytes=1 << 20, nproc=16
)


@pytest.fixture(scope="module")
def bwrap():
    ok, why = sandbox_lib.bwrap_status()
    assert ok, f"bubblewrap is needed for these tests (.ci/run installs it): {why}"


@pytest.fixture
def dirs(tmp_path):
    """(hidden, shown, token): a host dir the sandbox cannot see and one it sees read-only."""
    token = secrets.token_hex(6)
    shown = os.path.join(sys.prefix, f".ideal_sbx_probe_{token}")
    os.makedirs(shown)
    for d in (str(tmp_path), shown):
        with open(os.path.join(d, "keep.txt"), "w") as f:
            f.write("original")
        os.chmod(os.path.join(d, "keep.txt"), 0o644)
    try:
        yield str(tmp_path), shown, token
    finally:
        shutil.rmtree(shown, ignore_errors=True)


def escape_programs(hidden: str, shown: str, token: str, port: int) -> dict[str, str]:
    """name -> program that passes only if the escape works (each leaves a trace if it does)."""
    pw = {d: os.path.join(d, "pwned") for d in (hidden, shown)}
    keeps = [os.path.join(d, "keep.txt") for d in (hidden, shown)]
    progs = {}
    for where, d in (("hidden", hidden), ("shown", shown)):
        p = pw[d]
        progs[f"posix_open_{where}"] = (
            f"import posix\nfd = posix.open({p + '_posix'!r}, posix.O_CREAT | posix.O_WRONLY)\n"
            "posix.write(fd, b'x')"
        )
        progs[f"original_fileio_{where}"] = (  # the class a FileIO guard subclasses
            "import _io\nfileio = [c for c in _io.FileIO.__mro__ if c.__name__ == 'FileIO'][-1]\n"
            f"fileio({p + '_fileio'!r}, 'w').write(b'x')"
        )
        progs[f"mknod_{where}"] = f"import os\nos.mknod({p + '_mknod'!r})"
        progs[f"sqlite3_{where}"] = (
            f"import sqlite3\nc = sqlite3.connect({p + '_sqlite'!r})\n"
            "c.execute('create table t (x)')\nc.commit()"
        )
    for where, k in zip(("hidden", "shown"), keeps):
        progs[f"fchmod_{where}"] = f"import os\nfd = os.open({k!r}, os.O_RDONLY)\nos.fchmod(fd, 0)"
    touch = " ".join(pw[d] + "_sh" for d in (hidden, shown))
    progs["ctypes_system"] = (
        "import sys\nfor m in ('ctypes', '_ctypes'):\n    sys.modules.pop(m, None)\nimport ctypes\n"
        f"assert ctypes.CDLL(None).system(b'touch {touch}') == 0"
    )
    progs["reload_os_system"] = (
        f"import importlib, os\nimportlib.reload(os)\nassert os.system('touch {touch}') == 0"
    )
    progs["socket_tcp"] = (
        "import _socket\ns = _socket.SocketType()\ns.settimeout(2)\n"
        f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'pwned')"
    )
    progs["socket_abstract_unix"] = (
        "import _socket\ns = _socket.SocketType(_socket.AF_UNIX)\n"
        f"s.connect('\\0ideal_sbx_{token}')\ns.sendall(b'pwned')"
    )
    progs["proc_environ"] = (
        "import os\nfound = b''\nfor p in ['/proc/%d/environ' % os.getppid(), '/proc/1/environ']"
        " + ['/proc/%s/environ' % d for d in os.listdir('/proc') if d.isdigit()]:\n"
        "    try:\n        found += open(p, 'rb').read()\n    except OSError:\n        pass\n"
        "own = {f'{k}={v}'.encode() for k, v in os.environ.items()}\n"
        "foreign = set(found.split(b'\\0')) - own - {b''}\n"
        "print(sorted(foreign))\nassert foreign  # another process's environment was readable"
    )
    progs["kill_parent"] = (
        "import os, posix, signal\nfor pid in (os.getppid(), 1, -1):\n    try:\n"
        "        posix.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
        "import time\ntime.sleep(0.5)\nassert False, 'still alive after killing everything'"
    )
    progs["dev_shm_write"] = (
        f"import posix\nfd = posix.open('/dev/shm/ideal_sbx_{token}',"
        " posix.O_CREAT | posix.O_WRONLY)\n"
        "posix.write(fd, b'persist')\nassert False  # phase 1"
    )
    progs["fork"] = (  # passes iff a process could be created (default limits: nproc=1)
        "import posix\npid = __builtins__.__import__('posix').fork()\n"
        "if pid == 0:\n    posix._exit(0)\nassert pid > 0"
    )
    secret = os.path.join(hidden, "keep.txt")
    progs["output_log_symlink_fifo"] = (
        "import posix\nfor n in ('output.log', 'result.txt'):\n    try:\n        posix.unlink(n)\n"
        "    except OSError:\n        pass\n"
        f"posix.symlink({secret!r}, 'output.log')\nposix.mkfifo('result.txt')\n"
        "posix.close(1)\nposix._exit(0)"
    )
    progs["nonce_from_frames"] = (
        "import gc, os, re, sys\nfound = set()\nf = sys._getframe()\nwhile f is not None:\n"
        "    for v in list(f.f_locals.values()) + list(f.f_globals.values()):\n"
        "        if isinstance(v, str) and re.fullmatch('[0-9a-f]{32}', v):\n"
        "            found.add(v)\n    f = f.f_back\n"
        "for o in gc.get_objects():\n"
        "    if isinstance(o, (list, tuple)):\n        for v in o:\n"
        "            if isinstance(v, str) and re.fullmatch('[0-9a-f]{32}', v):\n"
        "                found.add(v)\n"
        "for n in found:\n    open('result.txt', 'w').write(n)\n"
        "    for fd in range(3, 64):\n        try:\n            os.write(fd, n.encode())\n"
        "        except OSError:\n            pass\n"
        "os._exit(0)\nassert False  # the wrong answer the forged verdict would hide"
    )
    return progs


def _listener():
    """A TCP listener and an abstract unix listener on the host; returns (port, token, hits)."""
    hits: list[str] = []
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.2)
    return tcp, hits


def _serve(sock, hits, stop):
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
            hits.append("connection")
            conn.close()
        except OSError:
            pass


def _processes_with(token: str) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def test_escapes_contained_under_bwrap(bwrap, dirs, monkeypatch):
    hidden, shown, token = dirs
    monkeypatch.setenv("IDEAL_SBX_CANARY", "evaluator-secret")
    tcp, hits = _listener()
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(f"\0ideal_sbx_{token}")
    unix.listen(8)
    unix.settimeout(0.2)
    stop = threading.Event()
    servers = [threading.Thread(target=_serve, args=(s, hits, stop)) for s in (tcp, unix)]
    for t in servers:
        t.start()
    try:
        progs = escape_programs(hidden, shown, token, tcp.getsockname()[1])
        del progs["fork"]  # allowed under FORKING; test_fork_blocked_by_default_limits
        results = sandbox_lib.run_programs(list(progs.values()), FORKING, sandbox="bwrap")
    finally:
        stop.set()
        for t in servers:
            t.join()
        tcp.close()
        unix.close()
    by_name = dict(zip(progs, results))
    escaped = sorted(name for name, r in by_name.items() if r.passed)
    assert escaped == [], {n: by_name[n].detail for n in escaped}
    assert all(r.sandbox == "bwrap" for r in results)
    assert hits == []  # no connection reached the host
    for d in (hidden, shown):
        assert sorted(os.listdir(d)) == ["keep.txt"], d  # nothing written, created, removed
        keep = os.path.join(d, "keep.txt")
        assert stat.S_IMODE(os.stat(keep).st_mode) == 0o644  # fchmod did not reach it
        with open(keep) as f:
            assert f.read() == "original"
    assert "evaluator-secret" not in "".join(r.detail for r in results)
    assert "IDEAL_SBX_CANARY" not in by_name["proc_environ"].detail
    assert "original" not in by_name["output_log_symlink_fifo"].detail  # no host file read back
    assert by_name["output_log_symlink_fifo"].status == "failed"  # finished, did not hang
    assert not os.path.exists(f"/dev/shm/ideal_sbx_{token}")
    # /dev/shm is private per run: a second program does not see the first one's file
    again = sandbox_lib.run_program(
        f"import os\nassert os.path.exists('/dev/shm/ideal_sbx_{token}')", LIMITS
    )
    assert not again.passed
    # the evaluator survived kill(getppid()) and kill(-1) and still scores programs
    assert sandbox_lib.run_program("assert sum([1, 2]) == 3", LIMITS).passed


def test_no_process_outlives_a_run(bwrap):
    """setsid / double-fork children die with the run, also when the run is killed at timeout."""
    token = secrets.token_hex(8)
    limits = sandbox_lib.SandboxLimits(timeout_s=2.0, nproc=16)
    survivor = (
        "import posix\nif posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
        f"        posix.execv('/bin/sh', ['sh', '-c', 'sleep 30; : {token}'])\n    posix._exit(0)\n"
        "import time\ntime.sleep(0.3)\n"
    )
    exits_at_once = sandbox_lib.run_program(survivor, limits)
    hangs = sandbox_lib.run_program(survivor + "while True:\n    pass\n", limits)
    assert exits_at_once.passed  # forking is allowed under nproc=16, and harmless
    assert hangs.status == "timeout"
    time.sleep(0.2)
    left = _processes_with(token)
    for pid in left:  # do not leak them if the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_fork_blocked_by_default_limits(bwrap):
    """nproc=1 (the default): no fork, no thread; with more, test_no_process_outlives_a_run."""
    r = sandbox_lib.run_program(escape_programs("/h", "/s", "t", 1)["fork"])
    assert not r.passed and "Resource temporarily unavailable" in r.detail


def test_fork_bomb_bounded_by_nproc(bwrap):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = sandbox_lib.run_program(bomb, sandbox_lib.SandboxLimits(timeout_s=2.0, nproc=32))
    assert not r.passed and r.status == "timeout"


def test_output_and_verdict_are_bounded(bwrap):
    """Output past fsize_bytes closes the pipe; closing stdout and the verdict pipe ends nothing."""
    limits = sandbox_lib.SandboxLimits(timeout_s=3.0, fsize_bytes=1 << 20)
    flood = sandbox_lib.run_program("import os\nwhile True:\n    os.write(1, b'x' * 65536)", limits)
    assert not flood.passed and "[output limit reached]" in flood.detail
    assert len(flood.detail) < 4000
    closer = (
        "import os\nfor fd in range(64):\n    try:\n        os.close(fd)\n    except OSError:\n"
    )
    closer += "        pass\nwhile True:\n    pass"
    start = time.monotonic()
    r = sandbox_lib.run_program(closer, limits)
    assert r.status == "timeout" and time.monotonic() - start < 6


def test_sandbox_view_is_minimal(bwrap):
    """Empty environment, scratch cwd, read-only root, no network interfaces but loopback."""
    prog = (
        "import os, socket\n"
        "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PWD',"
        " 'OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'LC_CTYPE'}, os.environ\n"
        "assert os.getcwd() == '/sandbox'\nassert os.getuid() != 0\n"
        "assert not os.path.exists('/home') and not os.path.exists('/var')\n"
        "assert [n for _, n in socket.if_nameindex()] == ['lo']\n"
        "for d in ('/', '/usr', '/etc'):\n    try:\n        open(d + '/x', 'w')\n"
        "    except OSError:\n        pass\n    else:\n        raise SystemExit(d + ' writable')\n"
        "open('/tmp/t', 'w').write('ok')\nopen('/dev/shm/t', 'w').write('ok')\n"
    )
    r = sandbox_lib.run_program(prog, LIMITS)
    assert r.passed, r.detail


def test_exit_paths_that_skip_the_checks_fail(bwrap):
    for prog in ("import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit", "exit()"):
        assert not sandbox_lib.run_program(prog + "\nassert False", LIMITS).passed, prog


@pytest.mark.xfail(strict=True, reason="known limit (docs/sandbox.md): harness emulation")
def test_known_limit_program_imitating_the_harness(bwrap):
    """A program that writes the verdict itself and exits shares the harness's process: it passes.

    This is reward hacking (like an object whose __eq__ is always True); the sandbox bounds harm,
    not score integrity. If this test ever passes, update docs/sandbox.md.
    """
    forge = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'PASS\\n')\n"
    forge += "    except OSError:\n        pass\nos._exit(0)\nassert False"
    assert not sandbox_lib.run_program(forge, LIMITS).passed


def test_without_bwrap_generated_code_is_refused_unless_inprocess_is_asked(monkeypatch):
    from ideal_jax.evaluate import runner

    monkeypatch.setattr(sandbox_lib, "bwrap_status", lambda: (False, "bwrap is not installed"))
    with pytest.raises(InputError, match="eval.code_sandbox") as e:
        sandbox_lib.run_program("assert True")
    assert e.value.field == "eval.code_sandbox" and "inprocess" in str(e.value)
    with pytest.raises(InputError):
        code_exec.score_code([{}], [["x"]], lambda p, c: "assert True")
    called = []

    def generate(prompts, *a):
        called.append(prompts)
        return [["    return 1\n"] for _ in prompts]

    task = {"he": {"type": "humaneval", "records": [_toy_problem()]}}
    with pytest.raises(InputError, match="not run without OS isolation"):
        runner.evaluate_tasks(task, generate, None, progress=False)
    assert called == []  # refused before any generation
    out = runner.evaluate_tasks(task, generate, None, progress=False, code_sandbox="auto")
    assert out["tasks"]["he"]["sandbox"] == "inprocess" and out["tasks"]["he"]["pass@1"] == 1.0
    out = runner.evaluate_tasks(task, generate, None, progress=False, code_sandbox="inprocess")
    assert out["tasks"]["he"]["sandbox"] == "inprocess"
    with pytest.raises(InputError, match="allowed: bwrap, inprocess, auto"):
        sandbox_lib.resolve_sandbox("docker")


def test_eval_output_names_the_backend(bwrap):
    from ideal_jax.evaluate import runner

    task = {"he": {"type": "humaneval", "records": [_toy_problem()]}}
    out = runner.evaluate_tasks(
        task, lambda p, *a: [["    return 1\n"] for _ in p], None, progress=False
    )
    assert out["tasks"]["he"]["sandbox"] == "bwrap" and out["tasks"]["he"]["pass@1"] == 1.0


def test_config_field_validated():
    from configs import tiny
    from ideal_jax.configlib.checks import CHOICES, validate_config

    cfg = tiny.get_config().unlock()
    assert cfg.eval.code_sandbox == "bwrap"
    assert set(CHOICES["eval.code_sandbox"]) == set(sandbox_lib.SANDBOXES)
    cfg.eval.code_sandbox = "none"
    with pytest.raises(InputError, match="bwrap, inprocess, auto"):
        validate_config(cfg)


def _toy_problem() -> dict:
    return {
        "task_id": "toy/0",
        "prompt": "def one():\n",
        "test": "def check(f):\n    assert f() == 1\n",
        "entry_point": "one",
        "canonical_solution": "    return 1\n",
    }
