"""Training metrics: window summaries, metrics.jsonl and TensorBoard event files.

The loop keeps each step's metrics on device and fetches a window of them every `log_every` steps
(one transfer); `summarize_window` turns that window into one JSON entry. `MetricsWriter` appends
entries to `<workdir>/metrics.jsonl` and `<workdir>/tb`; on resume it first drops the entries
beyond the restored step (and a line half-written by a killed process), so the curve has no
duplicates and no gaps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ideal_jax.utils.atomic import atomic_file

# Entry fields that do not depend on timing: a resumed run must reproduce them exactly.
DETERMINISTIC_FIELDS = ("step", "epoch", "loss", "domain_losses", "lr", "grad_norm", "tokens")


def summarize_window(
    window: Sequence[dict[str, Any]],
    *,
    step: int,
    epoch: int,
    domain_names: Sequence[str],
    seconds: float,
    positions_per_step: int,
) -> dict[str, Any]:
    """One log entry from the host copies of the window's per-step metrics.

    loss and per-domain losses are means over all response tokens of the window (token-weighted,
    so a domain with few tokens in one step does not dominate); lr and grad_norm are the last
    step's; tokens_per_s counts every position processed (padding included, as MFU does).
    """
    tokens = float(sum(float(m["tokens"]) for m in window))
    loss_sum = float(sum(float(m["loss"]) * float(m["tokens"]) for m in window))
    domain_sums = np.sum([np.asarray(m["domain_loss_sums"]) for m in window], axis=0)
    domain_tokens = np.sum([np.asarray(m["domain_tokens"]) for m in window], axis=0)
    domain_losses = {
        name: (float(domain_sums[i] / domain_tokens[i]) if domain_tokens[i] > 0 else None)
        for i, name in enumerate(domain_names)
    }
    examples = float(sum(float(m["examples"]) for m in window))
    seconds = max(seconds, 1e-9)
    last = window[-1]
    return {
        "step": int(step),
        "epoch": int(epoch),
        "loss": loss_sum / tokens if tokens > 0 else float("nan"),
        "domain_losses": domain_losses,
        "lr": float(last["lr"]),
        "grad_norm": float(last["grad_norm"]),
        "tokens": tokens,
        "steps": len(window),
        "tokens_per_s": len(window) * positions_per_step / seconds,
        "response_tokens_per_s": tokens / seconds,
        "examples_per_s": examples / seconds,
    }


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a metrics.jsonl (an unparseable last line, from a kill mid-write, skipped)."""
    if not os.path.exists(path):
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def _json_safe(value: Any) -> Any:
    """NaN / inf become null: strict JSON readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


class MetricsWriter:
    """Appends log entries to metrics.jsonl and TensorBoard (on the writing process only)."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(os.fspath(workdir), exist_ok=True)
        kept = [e for e in read_metrics(self.path) if int(e.get("step", -1)) <= resume_step]
        # Rewritten atomically (utils/atomic.py): a kill here loses nothing.
        with atomic_file(self.path) as f:
            for entry in kept:
                f.write(json.dumps(entry) + "\n")
        from tensorboardX import SummaryWriter  # heavy import, only where metrics are written

        # purge_step hides events a killed run wrote beyond the checkpoint we resume from.
        self._tb = SummaryWriter(
            os.path.join(os.fspath(workdir), "tb"), purge_step=int(resume_step) + 1
        )

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_json_safe(entry)) + "\n")
        step = entry["step"]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "examples_per_s"):
            value = entry.get(key)
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(f"train/{key}", value, step)
        for name, value in entry.get("domain_losses", {}).items():
            if value is not None:
                self._tb.add_scalar(f"domain_loss/{name}", value, step)
        self._tb.flush()

    def write_scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        """Extra scalars (e.g. evaluation results) to TensorBoard only."""
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
