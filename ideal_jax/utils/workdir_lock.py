"""One run per workdir: an exclusive ``flock`` on the workdir itself, holder named in DIR/.lock.

The lock is taken on a read-only descriptor of the directory, so it also works on a read-only
workdir; the kernel drops it when the holding process dies (kill -9 included), so a stale lock
of a dead process is simply taken over. DIR/.lock records the holder's pid and host for the
message a second run prints (exit 2); it is informational only and rewritten by each holder.
Locks are per host: a workdir on a network filesystem shared by several hosts is not protected
unless that filesystem implements flock across hosts (NFSv4 does, via byte-range locks).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
from collections.abc import Iterator

from ideal_jax.utils.atomic import atomic_file
from ideal_jax.utils.errors import InputError

LOCK_NAME = ".lock"
_held: dict[str, tuple[int, int]] = {}  # realpath -> (fd, depth): re-entrant within a process
_mutex = threading.Lock()


def check_workdir(workdir: str) -> None:
    """InputError (exit 2) if `workdir` cannot be a workdir: a file, or missing and uncreatable."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise InputError("the workdir is a file, not a directory; pass a directory", path=workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except FileExistsError:
        raise InputError("the workdir is a file, not a directory", path=workdir) from None
    except OSError as e:
        raise InputError(f"cannot create the workdir ({e.strerror})", path=workdir) from None


def _holder(workdir: str) -> str:
    try:
        with open(os.path.join(workdir, LOCK_NAME)) as f:
            info = json.loads(f.read(4096))
        return f"pid {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (holder unknown)"


def _record(workdir: str) -> None:
    """Write DIR/.lock (pid, host) atomically; skipped on a read-only workdir."""
    path = os.path.join(workdir, LOCK_NAME)
    with contextlib.suppress(OSError), atomic_file(path) as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)


def acquire(workdir: str) -> None:
    """Take the workdir lock (re-entrant in this process); InputError naming the holder if held."""
    check_workdir(workdir)
    key = os.path.realpath(workdir)
    with _mutex:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            return
        fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise InputError(
                    f"another run is using this workdir ({_holder(key)}); wait for it to finish "
                    "or use another --workdir",
                    path=workdir,
                ) from None
            raise
        _held[key] = (fd, 1)
    _record(key)


def release(workdir: str) -> None:
    key = os.path.realpath(workdir)
    with _mutex:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
    with contextlib.suppress(OSError):  # a read-only workdir keeps its (stale) record
        os.remove(os.path.join(key, LOCK_NAME))
    os.close(fd)  # closing the last descriptor drops the flock


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """``with hold(DIR):`` the run owns DIR; a second process gets InputError (exit 2)."""
    acquire(workdir)
    try:
        yield
    finally:
        release(workdir)
