"""Execute generated code against unit tests (HumanEval, MBPP) in a sandboxed subprocess.

Every program runs in its own ``python -I`` process, in a fresh temporary directory, with:
  * a wall-clock timeout, after which the whole process *group* is SIGKILLed (so children die too);
  * rlimits set in the child before any generated code runs: RLIMIT_AS (memory), RLIMIT_CPU,
    RLIMIT_FSIZE (also bounds the captured stdout/stderr), RLIMIT_NPROC, RLIMIT_NOFILE, no cores;
  * an emptied environment, HOME/TMPDIR pointing at the temporary directory;
  * a guard preamble that disables sockets, process creation (fork/exec/spawn/subprocess/kill),
    ctypes, and any file write, delete, rename or chmod outside the temporary directory;
  * a per-run random nonce the harness writes only after the program (and so its asserts) finished,
    so ``sys.exit(0)`` or ``os._exit(0)`` in a completion does not count as passing (this stops
    accidental early exits; code that inspects the harness's frames could still forge it).
This is defense in depth against buggy or hostile completions, not a security boundary: run
untrusted models' code inside a container as well. (RLIMIT_NPROC is not enforced for root, hence
the guards.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```")
MBPP_STOPS = ("[DONE]", "\n```", "\nassert ")

# Runs in the child as `python -I -c _HARNESS mem cpu fsize nproc nofile nonce`; cwd = sandbox dir.
_HARNESS = r"""
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


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed program."""

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


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run one Python program in the sandbox; it passes iff it runs to the end without error."""
    nonce = secrets.token_hex(16)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ideal_sbx_", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "prog.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        cpu = int(math.ceil(limits.timeout_s)) + 1
        argv = [sys.executable, "-I", "-c", _HARNESS, str(limits.memory_bytes), str(cpu)]
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
            return ExecResult(False, "timeout", detail, duration)
        result_path = os.path.join(tmp, "result.txt")
        ok = proc.returncode == 0 and _read_small(result_path) == nonce
        return ExecResult(ok, "passed" if ok else "failed", detail, duration)


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
) -> list[ExecResult]:
    """Run many programs with a small thread pool (each thread just waits on its subprocess)."""
    workers = max_workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = []
        for r in pool.map(lambda p: run_program(p, limits), programs):
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
) -> dict:
    """pass@k (for each k <= samples per problem) of completions[i] (n samples) for problems[i]."""
    programs, owner = [], []
    for i, (prob, samples) in enumerate(zip(problems, completions, strict=True)):
        for s in samples:
            programs.append(build(prob, s))
            owner.append(i)
    results = run_programs(programs, limits, max_workers, progress)
    n = [len(s) for s in completions]
    c = [0] * len(problems)
    statuses: dict[str, int] = {}
    for i, r in zip(owner, results):
        c[i] += int(r.passed)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    out: dict = {"n_examples": len(problems), "statuses": statuses, "num_correct": c}
    for k in ks:
        vals = [pass_at_k(ni, ci, k) for ni, ci in zip(n, c) if ni >= k]
        if vals:
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out
