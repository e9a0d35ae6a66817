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

Bars are for terminals. When the stream a bar writes to (stderr unless `file=`) is not a terminal
(nohup, SLURM, CI, a pipe) the bar is a `LineProgress` instead: one plain line at most every
LOG_EVERY_S seconds (count/total, rate, elapsed, ETA) and one when it closes, never a carriage
return. In a Jupyter notebook (tqdm.auto's widget) bars stay bars.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging as std_logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from absl import logging
from tqdm.auto import tqdm

# Off a terminal: a progress line at most this often (seconds), and one when the bar closes.
LOG_EVERY_S = 30.0
# tqdm.auto is the notebook widget bar inside Jupyter (its stderr is no terminal, yet it draws).
_NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__)
_clock = time.monotonic  # LineProgress's clock (tests replace it)

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
    disable: bool = False,
    log_every: float | None = None,
    **kwargs: Any,
) -> tqdm | LineProgress:
    """A progress display labelled "<stage>: <desc>" (off when `disable`, when configured off,
    or on processes > 0): a tqdm bar on a terminal, a LineProgress (a line at most every
    `log_every` seconds, default LOG_EVERY_S) on any other stream. `kwargs` go to tqdm
    (`initial` and `file` to both)."""
    import jax

    prefix = _LABEL.get()
    label = f"{prefix}: {desc}" if prefix else desc
    off = disable or not _ENABLED.get() or jax.process_index() != 0
    stream = kwargs.get("file") or sys.stderr
    if not off and not _NOTEBOOK and not _is_terminal(stream):
        return LineProgress(
            iterable,
            label,
            total=total,
            unit=unit,
            initial=kwargs.get("initial", 0),
            file=stream,
            log_every=LOG_EVERY_S if log_every is None else log_every,
        )
    options = {"leave": False, "dynamic_ncols": True, **kwargs}
    return tqdm(iterable, desc=label, total=total, unit=unit, disable=off, **options)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """Progress as plain lines for logs: the part of tqdm's interface the package uses
    (iterate, update, set_postfix, set_postfix_str, set_description, close, `with`, desc, n,
    total, disable).

    A line ("round 1 train: steps: 120/400 step (30%), 4.1 step/s, elapsed 00:29, ETA 01:08")
    is written when at least `log_every` seconds have passed since the last one (or since the
    start), checked at each update; close() (or the end of the iteration) writes the last one:
    "done" when the total was reached (or there is none), "stopped" when it was not.
    """

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str = "",
        *,
        total: int | None = None,
        unit: str = "it",
        initial: int = 0,
        file: TextIO | None = None,
        log_every: float = LOG_EVERY_S,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = self.initial = initial
        self.fp = file if file is not None else sys.stderr
        self.log_every = float(log_every)
        self.postfix = ""
        self.disable = False  # True once closed, as tqdm
        self._clock = _clock
        self.start_t = self._last_line = self._clock()

    def __len__(self) -> int:
        if self.total is not None:
            return self.total
        return len(self.iterable)  # TypeError when the iterable has no length, as tqdm

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        if self.disable:
            return
        self.n += n
        now = self._clock()
        if now - self._last_line >= self.log_every:
            self._last_line = now
            self._write(self._line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: lines are written by update and close only."""

    def close(self) -> None:
        if self.disable:
            return
        self.disable = True
        self._write(self._line(self._clock(), final=True))

    def _line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.start_t, 0.0)
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(
                f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}"
            )
        parts.append(f"elapsed {tqdm.format_interval(elapsed)}")
        if not final and rate > 0 and self.total is not None and self.total >= self.n:
            parts.append(f"ETA {tqdm.format_interval((self.total - self.n) / rate)}")
        if final:
            finished = self.total is None or self.n >= self.total
            parts.insert(0, "done" if finished else "stopped")
        line = ", ".join(parts) + (f" [{self.postfix}]" if self.postfix else "")
        return f"{self.desc}: {line}" if self.desc else line

    def _write(self, line: str) -> None:
        try:
            self.fp.write(line + "\n")
            self.fp.flush()
        except ValueError:  # the stream was closed under us (interpreter exit): nothing to say
            pass


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
