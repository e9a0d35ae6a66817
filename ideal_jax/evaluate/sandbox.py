"""Run generated Python programs in a sandbox (HumanEval / MBPP scoring: code_exec.py).

Two backends (docs/sandbox.md has the threat model and what each contains):

``bwrap`` (the default; ``eval.code_sandbox``): every program runs under bubblewrap in its own PID,
network, mount, IPC and UTS namespaces, with a read-only view of only the Python installation
(``/usr``, the interpreter's prefix and the evaluator's virtual environment), fresh size-capped
tmpfs for its scratch directory, ``/tmp`` and ``/dev/shm``, a new ``/proc`` and minimal ``/dev``,
an empty environment, no capabilities and (when the evaluator is root) a fresh random uid, with
rlimits on memory, CPU time, file size, processes (threads count) and open files. The wall-clock
timeout SIGKILLs bubblewrap, whose namespace init then dies and takes every process of the PID
namespace with it: nothing outlives the run. Output comes back through a pipe read with a byte
budget; the verdict through a second pipe. No secret exists inside the sandbox: a program passes iff
the harness, after the program's code object ran to its end, wrote the verdict and exited 0.

``inprocess`` (only if the config asks for it): the earlier guard, a ``python -I`` subprocess of the
evaluator that monkeypatches dangerous functions. It stops accidents, not a hostile program.

``auto`` uses bwrap when it works here and falls back to inprocess with a warning. With ``bwrap``
and no usable bubblewrap, nothing runs: ``resolve_sandbox`` raises InputError.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ideal_jax.evaluate.sandbox_harness import BWRAP_HARNESS, INPROCESS_HARNESS, VERDICT
from ideal_jax.utils.errors import InputError

SANDBOXES = ("bwrap", "inprocess", "auto")
_SANDBOX_FIELD = "eval.code_sandbox"


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed program (fsize_bytes also caps output and each tmpfs)."""

    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30
    fsize_bytes: int = 16 << 20
    nproc: int = 1
    nofile: int = 64


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """One program's outcome: status is 'passed', 'failed' or 'timeout'; detail: output tail."""

    passed: bool
    status: str
    detail: str
    duration_s: float
    sandbox: str = ""


@functools.lru_cache(maxsize=1)
def bwrap_status() -> tuple[bool, str]:
    """(usable, why not): bwrap is installed and a trivial program passes under the real flags."""
    if shutil.which("bwrap") is None:
        return False, "bwrap (the bubblewrap package) is not installed"
    try:
        r = _run_bwrap("pass", SandboxLimits(timeout_s=30.0))
    except OSError as e:
        return False, f"bwrap failed to start: {e}"
    if not r.passed:
        return False, f"bwrap cannot run a trivial program here: {r.detail.strip()[-300:]}"
    return True, ""


def resolve_sandbox(sandbox: str) -> str:
    """'bwrap' or 'inprocess' for a config value of eval.code_sandbox; InputError if unusable."""
    if sandbox not in SANDBOXES:
        raise InputError(
            f"{sandbox!r} is not allowed; allowed: {', '.join(SANDBOXES)}", field=_SANDBOX_FIELD
        )
    if sandbox == "inprocess":
        return "inprocess"
    ok, why = bwrap_status()
    if ok:
        return "bwrap"
    if sandbox == "auto":
        logging.warning(
            "code sandbox: %s; eval.code_sandbox='auto' falls back to the weaker in-process guard "
            "(not a security boundary, see docs/sandbox.md)",
            why,
        )
        return "inprocess"
    raise InputError(
        f"{why}; generated code is not run without OS isolation. Install bubblewrap "
        "(apt-get install bubblewrap) or set eval.code_sandbox='inprocess' to accept the weaker "
        "in-process guard (docs/sandbox.md)",
        field=_SANDBOX_FIELD,
    )


def run_program(
    program: str, limits: SandboxLimits = SandboxLimits(), sandbox: str = "bwrap"
) -> ExecResult:
    """Run one Python program in the sandbox; it passes iff it runs to the end without error."""
    if resolve_sandbox(sandbox) == "bwrap":
        return _run_bwrap(program, limits)
    return _run_inprocess(program, limits)


def _bwrap_argv(limits: SandboxLimits, uid: int, src_fd: int, res_fd: int) -> list[str]:
    size = str(max(limits.fsize_bytes, 1 << 20))
    argv = ["bwrap", "--die-with-parent", "--new-session", "--hostname", "sbx"]
    if uid:  # the evaluator is root: no user namespace; the harness drops to `uid` itself
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--cap-drop", "ALL"]
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # unprivileged: a user namespace too, and bwrap leaves no capabilities
        argv += ["--unshare-all"]
    argv += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = os.path.join("/", name)
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    # The fresh tmpfs mounts go first: an interpreter or venv that lives under /tmp (CI makes its
    # venvs with mktemp) is bound on top of the sandbox's /tmp below, not hidden by it.
    for path in ("/dev/shm", "/tmp", "/sandbox"):
        argv += ["--perms", "1777", "--size", size, "--tmpfs", path]
    made = {"/", "/dev/shm", "/tmp", "/sandbox"}
    for prefix in dict.fromkeys((sys.base_prefix, sys.prefix)):  # interpreter and its venv
        if os.path.realpath(prefix).startswith("/usr/"):
            continue
        parents = []  # created searchable (bwrap would copy a 0700 /root's mode)
        parent = os.path.dirname(prefix)
        while parent not in made:
            parents.append(parent)
            made.add(parent)
            parent = os.path.dirname(parent)
        for parent in reversed(parents):
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", os.path.realpath(prefix), prefix]
    argv += ["--remount-ro", "/", "--chdir", "/sandbox", "--clearenv"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/sandbox", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")  # threads count against nproc
    for key, value in env.items():
        argv += ["--setenv", key, value]
    cpu = int(math.ceil(limits.timeout_s)) + 1
    argv += ["--", sys.executable, "-I", "-c", BWRAP_HARNESS, str(limits.memory_bytes), str(cpu)]
    argv += [str(limits.fsize_bytes), str(limits.nproc), str(limits.nofile), str(uid)]
    return argv + [str(src_fd), str(res_fd)]


def _run_bwrap(program: str, limits: SandboxLimits) -> ExecResult:
    """Run under bubblewrap; output and verdict come back through pipes, each read with a budget."""
    start = time.monotonic()
    deadline = start + limits.timeout_s
    # root: a random unused uid per run (RLIMIT_NPROC counts per uid; root is exempt from it)
    uid = (1 << 24) + secrets.randbelow(1 << 29) if os.geteuid() == 0 else 0
    src_fd = os.memfd_create("prog.py", 0)  # the harness reads the program from it, then closes it
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    try:
        os.write(src_fd, program.encode("utf-8", errors="surrogateescape"))
        os.lseek(src_fd, 0, os.SEEK_SET)
        proc = subprocess.Popen(
            _bwrap_argv(limits, uid, src_fd, res_w),
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=out_w,
            pass_fds=(src_fd, res_w),
            close_fds=True,
            env={"PATH": "/usr/bin:/bin"},  # bwrap's own environment: nothing of the evaluator's
        )
    except BaseException:
        for fd in (out_r, res_r):
            os.close(fd)
        raise
    finally:
        for fd in (src_fd, out_w, res_w):
            os.close(fd)
    tail, verdict = bytearray(), bytearray()
    # The fds _drain closed itself. Each fd is closed exactly once: run_programs runs several
    # programs in threads, and a second close of a number another thread has just been given
    # (its pipe or program fd) would close that thread's fd instead.
    closed: set[int] = set()
    try:
        timed_out = _drain(
            proc, out_r, res_r, deadline, limits.fsize_bytes, tail, verdict, closed=closed
        )
    finally:
        if proc.poll() is None:
            proc.kill()  # the namespace's init dies with bwrap (--die-with-parent): all of it goes
        proc.wait()
        for fd in (out_r, res_r):
            if fd not in closed:
                os.close(fd)
    duration = time.monotonic() - start
    detail = bytes(tail).decode("utf-8", errors="replace")
    if timed_out:
        return ExecResult(False, "timeout", detail, duration, "bwrap")
    ok = proc.returncode == 0 and bytes(verdict) == VERDICT
    return ExecResult(ok, "passed" if ok else "failed", detail, duration, "bwrap")


def _drain(proc, out_r, res_r, deadline, out_budget, tail, verdict, keep=2000, closed=None) -> bool:
    """Read both pipes until EOF and the process exit, or the deadline; True if it timed out.

    Output beyond `out_budget` bytes closes the pipe (the program gets EPIPE; the fd is added to
    `closed`); only the last `keep` bytes are kept. The verdict pipe is read to at most 64 bytes.
    Reads never block.
    """
    sel = selectors.DefaultSelector()
    sel.register(out_r, selectors.EVENT_READ)
    sel.register(res_r, selectors.EVENT_READ)
    seen = 0
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            for key, _ in sel.select(min(remaining, 1.0)):
                data = os.read(key.fd, 65536)
                if key.fd == out_r:
                    seen += len(data)
                    tail += data
                    del tail[:-keep]
                    if data and seen > out_budget:
                        tail += b"\n[output limit reached]"
                        sel.unregister(out_r)
                        os.close(out_r)
                        if closed is not None:
                            closed.add(out_r)
                        continue
                else:
                    verdict += data[: max(0, 65 - len(verdict))]
                if not data or (key.fd == res_r and len(verdict) > 64):
                    sel.unregister(key.fd)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return True
        return False
    finally:
        sel.close()


def _run_inprocess(program: str, limits: SandboxLimits) -> ExecResult:
    """The weaker guard: a `python -I` subprocess that monkeypatches dangerous functions."""
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ideal_sbx_", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        cpu = int(math.ceil(limits.timeout_s)) + 1
        argv = [sys.executable, "-I", "-c", INPROCESS_HARNESS, str(limits.memory_bytes), str(cpu)]
        argv += [str(limits.fsize_bytes), str(limits.nproc), str(limits.nofile), nonce]
        log_path = os.path.join(tmp, "output.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group, killed as a whole below
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        duration = time.monotonic() - start
        detail = _tail(log_path)
        if timed_out:
            return ExecResult(False, "timeout", detail, duration, "inprocess")
        result_path = os.path.join(tmp, "result.txt")
        ok = proc.returncode == 0 and _read_small(result_path) == nonce
        return ExecResult(ok, "passed" if ok else "failed", detail, duration, "inprocess")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's process group (also any children it left behind), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_small(path: str, limit: int = 4096) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return ""


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits = SandboxLimits(),
    max_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    sandbox: str = "bwrap",
) -> list[ExecResult]:
    """Run many programs with a small thread pool (each thread just waits on its subprocess)."""
    run = _run_bwrap if resolve_sandbox(sandbox) == "bwrap" else _run_inprocess
    workers = max_workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = []
        for r in pool.map(lambda p: run(p, limits), programs):
            results.append(r)
            if progress is not None:
                progress(1)
        return results
