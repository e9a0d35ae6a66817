"""DaaR's non-JSON artifacts (.npz arrays, the selected records' JSONL), written like every other.

JSON artifacts go through ideal_jax/artifacts.py (`cached`, `write_json`, `read_json`), which has
no writer for arrays or text lines; these are its counterparts for the DaaR workdir: written to a
temporary file and renamed (a reader sees the old file or the new one, never half of one), by the
lead host only, as `artifacts.write_json`.
"""

from __future__ import annotations

import os

import numpy as np

from ideal_jax.utils.distributed import is_lead_host


def _atomic(path: str, write, mode: str) -> None:
    if not is_lead_host():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` as an .npz file (the `save` of `artifacts.cached` for array artifacts)."""
    _atomic(path, lambda f: np.savez(f, **arrays), "wb")


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (the `load` of `artifacts.cached` for array artifacts)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")
