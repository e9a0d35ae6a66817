"""Errors raised for bad user input (they name the file, record and field), and the one-line
description of a machine fault (a full disk, a read-only directory) for the command line."""

from __future__ import annotations

import errno
import os
import re


class InputError(ValueError):
    """Bad user input (data, config, checkpoint). The message names file, record and field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        record: int | str | None = None,
        field: str | None = None,
    ):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.record, self.field = path, record, field


# --- faults of the machine: one line for the user, not a traceback ---

_NO_SPACE = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')
_BYTES = re.compile(r"Failed to write (\d+) bytes")


def _chain(error: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while error is not None and id(error) not in seen:
        out.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return out


def _free_bytes(path: str) -> int | None:
    import shutil

    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def describe_machine_error(error: BaseException, workdir: str | None = None) -> str | None:
    """One line for a fault of the machine the run cannot fix: a full disk or quota (an OSError
    ENOSPC / EDQUOT, or orbax/tensorstore's RESOURCE_EXHAUSTED "No space left on device"), a
    directory it may not write. None for anything else (bugs stay tracebacks; a device's
    RESOURCE_EXHAUSTED "Out of memory" is not a full disk)."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _no_space(e.filename or workdir, None)
        text = str(e)
        if any(marker in text for marker in _NO_SPACE):
            paths = _QUOTED_PATH.findall(text)
            needed = _BYTES.search(text)
            return _no_space(
                paths[-1] if paths else getattr(e, "filename", None) or workdir,
                int(needed.group(1)) if needed else None,
            )
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            if e.filename:
                return (
                    f"file {e.filename}: cannot write it ({e.strerror}); is the workdir read-only?"
                )
    return None


def _no_space(path: str | None, needed: int | None) -> str:
    where = f"file {path}: " if path else ""
    free = _free_bytes(os.path.abspath(path)) if path else None
    amounts = []
    if needed is not None:
        amounts.append(f"a write of {_size(needed)} failed")
    if free is not None:
        amounts.append(f"{_size(free)} free there now")
    detail = f" ({'; '.join(amounts)})" if amounts else ""
    return (
        f"{where}no space left on the device{detail}; free space and rerun the same command: "
        "it resumes from the last finished step"
    )
