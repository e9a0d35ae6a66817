"""The one atomic writer: every file or directory the package writes for a reader to trust appears
whole or not at all (a temporary name beside it, then `os.replace`).

    with atomic_path(path) as tmp:           # any writer that takes a path (safetensors, savefig,
        save_file(tensors, tmp)              # a directory built in place)
    with atomic_file(path, "w") as f:        # a file object, flushed and fsynced before the rename
        f.write(text)
    write_json_atomic(path, obj)             # JSON (numpy and jax values converted)

A full disk or Ctrl-C while writing leaves the old file and removes the partial one. The
temporary name is `PATH.tmp.PID.RANDOM` (+ `suffix`, for writers that read the format from it):
unique per process and call, so hosts sharing a file system never write the same one.
Writing only on the lead host is the caller's choice (ideal_jax/artifacts.py `write_json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "") -> Iterator[str]:
    """A temporary path beside `path` (its directory created); renamed to `path` when the block
    ends without an exception, removed (file or directory) when it raises."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}"  # unique per process, call
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: the old file stays, the partial one goes
        with contextlib.suppress(OSError):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """An open file (text files in UTF-8) that becomes `path` when the block ends."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON (indent 2, key order kept) through `atomic_file`: readers never see half a file."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # numpy and jax arrays
        return np.asarray(obj).tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)
