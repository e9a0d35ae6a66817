"""Run the escape programs of test_sandbox_escapes.py under a backend and say which did harm.

    python tests/sandbox_escape_report.py [bwrap] [inprocess]

Not part of the suite: under "inprocess" the escapes really happen (inside temporary directories
and a throwaway runner process; kill(1) and kill(-1) are left out there, as root they would hit the
whole machine). Each program runs in its own runner process, so one that kills its evaluator only
costs that row.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sandbox_escapes import (  # noqa: E402
    FORKING,
    _processes_with,
    _serve,
    escape_programs,
)

from ideal_jax.evaluate import sandbox as sandbox_lib  # noqa: E402

SURVIVOR = (  # a wrong answer whose grandchild, in its own session, should outlive the run
    "import posix\nif posix.fork() == 0:\n    posix.setsid()\n    if posix.fork() == 0:\n"
    "        posix.execv('/bin/sh', ['sh', '-c', 'sleep 30; : TOKEN'])\n    posix._exit(0)\n"
    "assert False"
)


def runner(backend: str, name: str) -> dict:
    """In a throwaway process: run one program, then look for its traces on the host."""
    hidden = tempfile.mkdtemp(prefix="ideal_escape_")
    token = secrets.token_hex(6)
    shown = os.path.join(sys.prefix, f".ideal_sbx_probe_{token}")
    os.makedirs(shown)
    for d in (hidden, shown):
        with open(os.path.join(d, "keep.txt"), "w") as f:
            f.write("original")
        os.chmod(os.path.join(d, "keep.txt"), 0o644)
    hits: list[str] = []
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.settimeout(0.2)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(f"\0ideal_sbx_{token}")
    unix.listen(8)
    unix.settimeout(0.2)
    stop = threading.Event()
    threads = [threading.Thread(target=_serve, args=(s, hits, stop)) for s in (tcp, unix)]
    for t in threads:
        t.start()
    progs = escape_programs(hidden, shown, token, tcp.getsockname()[1])
    progs["setsid_survivor"] = SURVIVOR.replace("TOKEN", token)
    prog = progs[name]
    if backend == "inprocess" and name == "kill_parent":
        prog = prog.replace("(os.getppid(), 1, -1)", "(os.getppid(),)")
    limits = FORKING if name == "setsid_survivor" else sandbox_lib.SandboxLimits(timeout_s=5.0)
    try:
        r = sandbox_lib.run_program(prog, limits, sandbox=backend)
    finally:
        stop.set()
        for t in threads:
            t.join()
    harm = []
    for d in (hidden, shown):
        extra = sorted(set(os.listdir(d)) - {"keep.txt"})
        if extra:
            harm.append(f"created {extra} in {'hidden' if d == hidden else 'shown'} dir")
        mode = stat.S_IMODE(os.stat(os.path.join(d, "keep.txt")).st_mode)
        if mode != 0o644:
            harm.append(f"outside file chmod to {oct(mode)}")
    if hits:
        harm.append("connected to the host")
    if "evaluator-secret" in r.detail or "IDEAL_SBX_CANARY" in r.detail:
        harm.append("read the evaluator's environment")
    if os.path.exists(f"/dev/shm/ideal_sbx_{token}"):
        harm.append("file persisted in /dev/shm")
        os.remove(f"/dev/shm/ideal_sbx_{token}")
    if "original" in r.detail:
        harm.append("harness read an outside file")
    left = _processes_with(token)
    if left:
        harm.append(f"{len(left)} process(es) outlived the run")
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    if r.passed:
        harm.append("reported as passed")
    shutil.rmtree(hidden, ignore_errors=True)
    shutil.rmtree(shown, ignore_errors=True)
    return {"status": r.status, "harm": harm}


def main(backends: list[str]) -> None:
    names = list(escape_programs("/h", "/s", "t", 1)) + ["setsid_survivor"]
    env = {**os.environ, "IDEAL_SBX_CANARY": "evaluator-secret"}  # in the runner's /proc environ
    rows = {}
    for name in names:
        row = {}
        for backend in backends:
            try:
                p = subprocess.run(
                    [sys.executable, __file__, "--child", backend, name],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    env=env,
                )
            except subprocess.TimeoutExpired:
                row[backend] = "evaluator hung (killed after 30 s)"
                continue
            if p.returncode != 0:
                row[backend] = f"runner died (exit {p.returncode}): evaluator killed"
            else:
                out = json.loads(p.stdout.strip().splitlines()[-1])
                row[backend] = "; ".join(out["harm"]) or f"contained ({out['status']})"
        rows[name] = row
        print(f"{name:26s} " + " | ".join(f"{b}: {row[b]}" for b in backends), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(runner(sys.argv[2], sys.argv[3])))
    else:
        main(sys.argv[1:] or ["bwrap", "inprocess"])
