"""DaaR's non-JSON artifacts (.npz arrays, the selected records' JSONL), written like every other.

JSON artifacts go through ideal_jax/artifacts.py (`cached`, `write_json`, `read_json`), which has
no writer for arrays or text lines; these are its counterparts for the DaaR workdir: written by
the one atomic writer (ideal_jax/utils/atomic.py: a reader sees the old file or the new one, never
half of one), by the lead host only, as `artifacts.write_json`.
"""

from __future__ import annotations

import numpy as np

from ideal_jax.utils.atomic import atomic_file
from ideal_jax.utils.distributed import is_lead_host


def _atomic(path: str, write, mode: str) -> None:
    if not is_lead_host():
        return
    with atomic_file(path, mode) as f:
        write(f)


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` as an .npz file (the `save` of `artifacts.cached` for array artifacts)."""
    _atomic(path, lambda f: np.savez(f, **arrays), "wb")


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file (the `load` of `artifacts.cached` for array artifacts)."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def write_text(path: str, text: str) -> None:
    _atomic(path, lambda f: f.write(text), "w")
