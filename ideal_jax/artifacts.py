"""The artifact cache of a run: JSON written by the lead host through the one atomic writer
(ideal_jax/utils/atomic.py), per-stage timers, and "compute once, then reuse".

Every resumable artifact (a round's mixture.json, eval.json, influence.json, reweight.json; DaaR's
probe, centroid and selection files; compare's files) goes through `cached` or `fixed`: if the file
exists it is checked against the fingerprints of what produced it (ideal_jax/provenance.py) and
read back; otherwise it is computed, written atomically by the lead host, and recorded. IDEAL,
DaaR and compare share this one cache; none of them writes artifacts another way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from ideal_jax import provenance
from ideal_jax.utils import progress
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.distributed import is_lead_host
from ideal_jax.utils.errors import InputError


def write_json(path: str, obj: Any) -> None:
    """Atomic JSON write by the lead host (other hosts write nothing)."""
    if is_lead_host():
        write_json_atomic(path, obj)


def read_json(path: str) -> Any:
    """A JSON artifact; InputError naming the file if it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(
            f"artifact is not valid JSON ({e}); delete it to recompute", path=path
        ) from None


class Timer:
    """Wall time per stage, kept in DIR/timings.json (stages skipped on resume keep theirs)."""

    def __init__(self, path: str):
        self.path = path
        self.times = read_json(path) if os.path.exists(path) else {}
        # "round 2" for DIR/round_2/timings.json: the label of this round's log lines and bars.
        directory = os.path.basename(os.path.dirname(os.path.abspath(path)))
        self.label = directory.replace("_", " ") if directory.startswith("round_") else ""

    def run(self, name: str, fn: Callable, *args, record: bool = True, **kwargs):
        start = time.perf_counter()
        with progress.stage(f"{self.label} {name}".strip()):
            out = fn(*args, **kwargs)
        if record:
            self.times[name] = round(time.perf_counter() - start, 3)
            write_json(self.path, self.times)
        return out


def cached(
    path: str,
    compute: Callable[[], Any],
    *,
    inputs: Mapping[str, str] | None = None,
    timer: Timer | None = None,
    name: str | None = None,
    load: Callable[[str], Any] = read_json,
    save: Callable[[str, Any], None] = write_json,
) -> Any:
    """The artifact at `path` if it exists (resume), else `compute()` written atomically.

    inputs: fingerprints of what the artifact depends on (provenance.py); a cached artifact
    produced from other inputs, or edited since, is an InputError, not reused. `load`/`save`
    read and write it (JSON by default; e.g. a mixture manifest or a .npz for arrays).
    """
    name = name or os.path.basename(path)
    if provenance.reuse(path, inputs) if inputs is not None else os.path.exists(path):
        logging.info("%s: reusing %s", f"{timer.label if timer else ''} {name}".strip(), path)
        return load(path)
    out = timer.run(name, compute) if timer is not None else compute()
    save(path, out)
    if inputs is not None:
        provenance.record(path, inputs)
    return out
