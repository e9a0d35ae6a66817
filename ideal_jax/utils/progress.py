"""What a run says while it runs: absl log lines at the start and end of each stage (with its
duration) and tqdm progress bars labelled with the stage they belong to ("round 1 influence").

    with progress.stage("round 1 influence"):        # logs start / end + duration
        for batch in progress.bar(batches, "curvature factors"):   # "round 1 influence: ..."
            ...

The label is carried by a context variable, so code deep inside a stage (the curvature passes)
labels its bars without every caller threading the round through; it is display state only and
never affects results. `configure(enabled=...)` (main.run, from cfg.progress) turns the bars off;
log lines stay. Only process 0 draws bars. `show_own_info_logs()` lets ideal_jax's INFO lines
through while other libraries' INFO logs (orbax, XLA) stay hidden.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging as std_logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from absl import logging
from tqdm.auto import tqdm

_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("ideal_jax_stage", default="")
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("ideal_jax_bars", default=True)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configure(*, enabled: bool) -> None:
    """Progress bars on or off for this process (cfg.progress)."""
    _ENABLED.set(bool(enabled))


def label() -> str:
    return _LABEL.get()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Log the start and end (with duration) of a stage; bars inside carry its name."""
    full = f"{_LABEL.get()} {name}".strip() if not name.startswith("round ") else name
    token = _LABEL.set(full)
    start = time.perf_counter()
    logging.info("%s: start", full)
    ok = False
    try:
        yield
        ok = True
    finally:
        _LABEL.reset(token)
        logging.info(
            "%s: %s in %.1f s", full, "done" if ok else "failed", time.perf_counter() - start
        )


def bar(
    iterable: Iterable | None = None,
    desc: str = "",
    *,
    total: int | None = None,
    unit: str = "batch",
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar labelled "<stage>: <desc>" (off when configured off or on processes > 0)."""
    import jax

    prefix = _LABEL.get()
    return tqdm(
        iterable,
        desc=f"{prefix}: {desc}" if prefix else desc,
        total=total,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        disable=not _ENABLED.get() or jax.process_index() != 0,
        **kwargs,
    )


class _OwnInfoOnly(std_logging.Filter):
    """INFO and below only from ideal_jax's own files; warnings and errors from everyone."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def show_own_info_logs() -> None:
    """absl at INFO, but INFO lines of other libraries dropped (call once, in the entry point)."""
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())
