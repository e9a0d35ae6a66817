"""Execute generated code against unit tests (HumanEval, MBPP) in a sandbox.

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
import re
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

from ideal_jax.utils.errors import InputError

HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```")
MBPP_STOPS = ("[DONE]", "\n```", "\nassert ")

# The inprocess backend: runs as `python -I -c _INPROCESS_HARNESS mem cpu fsize nproc nofile nonce`
# with cwd = a temporary directory.
_INPROCESS_HARNESS = r"""
import sys, os, resource, builtins, io, _io
def _setup():
    mem, cpu, fsize, nproc, nofile = map(int, sys.argv[1:6])
    nonce = sys.argv[6]
    sys.argv = ["prog.py"]  # the nonce must not be visible to the program
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass
    root = os.path.realpath(os.getcwd())
    src = open("prog.py", encoding="utf-8").read()
    result = open("result.txt", "w")
    def denied(*a, **k):
        raise PermissionError("disabled in the evaluation sandbox")
    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor
        p = os.path.realpath(os.fsdecode(path))
        return p == root or p.startswith(root + os.sep)
    import socket, _socket
    for mod in (socket, _socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd"):
            if hasattr(mod, name):
                setattr(mod, name, denied)
    import subprocess, _posixsubprocess
    subprocess.Popen = denied
    _posixsubprocess.fork_exec = denied
    for name in dir(os):
        if name.startswith(("exec", "spawn", "posix_spawn", "fork")) or name in (
                "system", "popen", "kill", "killpg", "setsid", "setpgid"):
            setattr(os, name, denied)
    for name in ("ctypes", "_ctypes", "multiprocessing"):
        sys.modules[name] = None
    real_open, real_os_open = _io.open, os.open
    def guarded_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"write outside the sandbox: {file!r}")
        return real_open(file, mode, *a, **k)
    def relative_to_fd(k):  # paths relative to a directory fd cannot be checked: refuse them
        return any(k.get(n) is not None for n in ("dir_fd", "src_dir_fd", "dst_dir_fd"))
    def guarded_os_open(path, flags, *a, **k):
        wr = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        if flags & wr and (not inside(path) or relative_to_fd(k)):
            raise PermissionError(f"write outside the sandbox: {path!r}")
        return real_os_open(path, flags, *a, **k)
    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and not inside(file):
                raise PermissionError(f"write outside the sandbox: {file!r}")
            super().__init__(file, mode, *a, **k)
    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = guarded_os_open
    def path_guard(fn, nargs):
        def wrapper(*a, **k):
            if not all(inside(p) for p in a[:nargs]) or relative_to_fd(k):
                raise PermissionError(f"{fn.__name__} outside the sandbox")
            return fn(*a, **k)
        return wrapper
    for name, nargs in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("chmod", 1),
                        ("chown", 1), ("truncate", 1), ("utime", 1), ("mkfifo", 1),
                        ("rename", 2), ("replace", 2), ("link", 2), ("symlink", 2)):
        if hasattr(os, name):
            setattr(os, name, path_guard(getattr(os, name), nargs))
    return src, result, nonce
def _run():  # locals, not module globals, so sys.modules["__main__"] does not expose the nonce
    src, result, nonce = _setup()
    exec(compile(src, "prog.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    result.write(nonce)
    result.flush()
_run()
"""


# Runs inside bubblewrap as `python -I -c _BWRAP_HARNESS mem cpu fsize nproc nofile uid src res`
# (as the namespace's root with only CAP_SETUID/SETGID until it drops to `uid`, or as the caller's
# uid when uid is 0). It holds no secret: the verdict is that this code reached the write on res_fd.
_BWRAP_HARNESS = r"""
import os, sys, resource
def _setup():
    mem, cpu, fsize, nproc, nofile, uid, src_fd, res_fd = map(int, sys.argv[1:9])
    sys.argv = ["prog.py"]
    with open(src_fd, "rb", closefd=True) as f:
        src = f.read()
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(lim, (val, val))
    if uid:  # an unused uid: no capabilities left, no other process to signal, NPROC enforced
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid):
            os._exit(97)
    return compile(src, "prog.py", "exec"), res_fd
def _main():
    code, res_fd = _setup()
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.write(res_fd, b"PASS\n")
    os._exit(0)
_main()
"""
_VERDICT = b"PASS\n"
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
    argv += ["--", sys.executable, "-I", "-c", _BWRAP_HARNESS, str(limits.memory_bytes), str(cpu)]
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
    try:
        timed_out = _drain(proc, out_r, res_r, deadline, limits.fsize_bytes, tail, verdict)
    finally:
        if proc.poll() is None:
            proc.kill()  # the namespace's init dies with bwrap (--die-with-parent): all of it goes
        proc.wait()
        for fd in (out_r, res_r):
            try:
                os.close(fd)
            except OSError:
                pass
    duration = time.monotonic() - start
    detail = bytes(tail).decode("utf-8", errors="replace")
    if timed_out:
        return ExecResult(False, "timeout", detail, duration, "bwrap")
    ok = proc.returncode == 0 and bytes(verdict) == _VERDICT
    return ExecResult(ok, "passed" if ok else "failed", detail, duration, "bwrap")


def _drain(proc, out_r, res_r, deadline, out_budget, tail, verdict, keep=2000) -> bool:
    """Read both pipes until EOF and the process exit, or the deadline; True if it timed out.

    Output beyond `out_budget` bytes closes the pipe (the program gets EPIPE); only the last `keep`
    bytes are kept. The verdict pipe is read to at most 64 bytes. Reads never block.
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
        argv = [sys.executable, "-I", "-c", _INPROCESS_HARNESS, str(limits.memory_bytes), str(cpu)]
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    # Product form avoids the huge binomials.
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ----------------------------------------------------------------------------- HumanEval / MBPP


def clean_completion(completion: str, stops: Sequence[str]) -> str:
    """Strip a leading markdown fence and cut at the first stop sequence."""
    text = re.sub(r"^\s*```(?:python|py)?\s*\n", "", completion)
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def humaneval_prompt(problem: dict) -> str:
    """HumanEval is zero-shot: the prompt is the signature plus docstring."""
    return problem["prompt"]


def humaneval_program(problem: dict, completion: str) -> str:
    """Prompt + completion + the problem's test + the call of check() on the entry point."""
    body = clean_completion(completion, HUMANEVAL_STOPS)
    return f"{problem['prompt']}{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_prompt(problem: dict, shots: Sequence[dict] = ()) -> str:
    """The MBPP paper's format: task text, its tests, then code between [BEGIN] and [DONE]."""

    def block(p: dict) -> str:
        tests = "\n".join(p["test_list"])
        return (
            f"You are an expert Python programmer, and here is your task: {p['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
        )

    return "".join(f"{block(s)}{s['code']}\n[DONE]\n\n" for s in shots) + block(problem)


def mbpp_program(problem: dict, completion: str) -> str:
    """Setup code + completion + the asserts of test_list."""
    body = clean_completion(completion, MBPP_STOPS)
    tests = "\n".join(problem["test_list"])
    return f"{problem.get('test_setup_code', '')}\n{body}\n\n{tests}\n"


def score_code(
    problems: Sequence[dict],
    completions: Sequence[Sequence[str]],
    build: Callable[[dict, str], str],
    ks: Sequence[int] = (1,),
    limits: SandboxLimits = SandboxLimits(),
    max_workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    sandbox: str = "bwrap",
) -> dict:
    """pass@k (for each k <= samples per problem) of completions[i] (n samples) for problems[i].

    The result names the sandbox backend the programs ran under ("bwrap" or "inprocess").
    """
    backend = resolve_sandbox(sandbox)
    programs, owner = [], []
    for i, (prob, samples) in enumerate(zip(problems, completions, strict=True)):
        for s in samples:
            programs.append(build(prob, s))
            owner.append(i)
    results = run_programs(programs, limits, max_workers, progress, backend)
    n = [len(s) for s in completions]
    c = [0] * len(problems)
    statuses: dict[str, int] = {}
    for i, r in zip(owner, results):
        c[i] += int(r.passed)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    out: dict = {"n_examples": len(problems), "statuses": statuses, "num_correct": c}
    out["sandbox"] = backend
    for k in ks:
        vals = [pass_at_k(ni, ci, k) for ni, ci in zip(n, c) if ni >= k]
        if vals:
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out
