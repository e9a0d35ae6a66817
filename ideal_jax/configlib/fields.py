"""A config as JSON: its flat fields and its fingerprint (what provenance records), and the fields
that may change without invalidating finished work."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import ml_collections

# Fields that may change between a run and its resumption without invalidating finished work.
RESUMABLE_FIELDS = (
    "rounds",
    "seeds",  # every seed has its own directory (seed_S/); more seeds add directories
    "compare.methods",  # every method has its own directories; adding one adds them
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "eval.batch_size",
    # memory for speed: the EK-FAC fit from kept captures gives the same Λ* as its own pass
    "curvature.keep_captures_gib",
    "progress",
    "export.final_model",  # exports read finished artifacts; they never change them
    "export.round",
    "export.dtype",
)


def to_dict(cfg: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def to_json(cfg: ml_collections.ConfigDict | dict) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True, default=str)


def flat_fields(cfg: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{"train.learning_rate": 0.01, ...}: every leaf field of the config, as JSON values."""
    return flatten(json.loads(to_json(cfg)))


def fingerprint(cfg: ml_collections.ConfigDict | dict, ignore=RESUMABLE_FIELDS) -> str:
    flat = {k: v for k, v in flatten(json.loads(to_json(cfg))).items() if k not in ignore}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
