"""The bubblewrap runner closes each of its fds exactly once. run_programs runs programs in
threads: a second close of a number that another thread has just been given (its pipe or its
program's memfd) closes that thread's fd — seen in CI as EBADF for a benign program that ran right
after the output-flooding one."""

import os
import shutil

import pytest

from ideal_jax.evaluate import sandbox as sandbox_lib

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")


@pytest.mark.parametrize(
    "program", ["while True:\n    print('x' * 100000)", "assert sum([1, 2]) == 3"]
)
def test_every_fd_is_closed_once(monkeypatch, program):
    """Every fd made by os.pipe / os.memfd_create during a run is closed exactly once, and never
    after it was closed (a second close of the number)."""
    opened, made, errors = set(), set(), []
    real_pipe, real_memfd, real_close = os.pipe, os.memfd_create, os.close

    def pipe():
        fds = real_pipe()
        opened.update(fds)
        made.update(fds)
        return fds

    def memfd_create(*args):
        fd = real_memfd(*args)
        opened.add(fd)
        made.add(fd)
        return fd

    def close(fd):
        if fd in made:
            if fd not in opened:
                errors.append(fd)
            opened.discard(fd)
        real_close(fd)

    for name, fn in (("pipe", pipe), ("memfd_create", memfd_create), ("close", close)):
        monkeypatch.setattr(sandbox_lib.os, name, fn)
    limits = sandbox_lib.SandboxLimits(timeout_s=3.0, memory_bytes=512 << 20, fsize_bytes=1 << 16)
    result = sandbox_lib._run_bwrap(program, limits)
    monkeypatch.undo()
    assert result.passed == program.startswith("assert")
    assert len(made) >= 5  # the program's memfd and two pipes
    assert errors == []  # no fd number closed twice
    assert opened == set()  # and none left open
