"""Config checks that need no typed config: enumerated fields, numeric ranges, fields that must
agree, and a section's fields for a typed config (`section_fields`).

Each typed config (ReweightConfig, PolicyConfig, CompareConfig, DaarConfig) checks its own choices
and ranges with `check_fields` when it is built; the tables here hold the sections that have none.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from ideal_jax.utils.errors import InputError

MISSING = object()
MESH_AXES = ("data", "fsdp", "tensor")  # ideal_jax/sharding.py


# Enumerated fields of the sections that have no typed config of their own, and every value the
# code accepts (the modules named check them again, later). `validate_config` checks them when a
# config is loaded, before any work or any file is written; tests/test_configs.py keeps this table
# equal to the modules' own lists. The typed configs hold their own: cfg.reweight's in
# ideal_jax/reweight.py (ReweightConfig) and ideal_jax/step_policy.py (PolicyConfig), cfg.compare's
# in ideal_jax/compare/config.py (CompareConfig); ideal_jax/stages.py builds and checks them all.
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("ideal", "sft", "influence", "eval", "daar", "export", "compare"),  # main.py
    "data.truncate": ("left_prompt", "right", "drop"),  # data/formatting.py
    "data.batching": ("pack", "pad"),  # data/batching.py
    "data.upsample": ("fresh_first", "repeat"),  # data/mixture.py
    "train.budget": ("d0_steps", "epochs"),  # data/suite.py
    "model.dtype": ("float32", "bfloat16"),  # model/config.py
    "train.schedule": ("cosine", "linear", "constant"),  # train/state.py
    "curvature.estimator": ("empirical", "fisher", "ggn_exact"),  # curvature/kfac.py
    "curvature.correction": ("per_example", "per_batch"),  # influence/stage.py
    "curvature.subsample": ("alpha_se", "fixed", "sigma"),  # influence/stage.py SUBSAMPLES
    "curvature.allocation": ("proportional", "per_domain"),  # influence/stage.py ALLOCATIONS
    "influence.operator": (
        "identity",
        "kfac",
        "ekfac",
        "exact",
        "exact_block",
        "cg",
        "cg_block",
    ),
    "influence.cg_preconditioner": ("none", "kfac", "ekfac"),  # curvature/operators.py
    "influence.scaling": ("paper", "exact"),  # influence/alpha.py
    "influence.reference_weighting": ("capability", "token"),  # influence/alpha.py
    "daar.generator": ("model", "file"),  # daar/job.py
    "daar.select_method": ("top_fraction", "per_domain"),  # daar/config.py
    "eval.code_sandbox": ("bwrap", "inprocess", "auto"),  # evaluate/sandbox.py
}

# Numeric fields with an obvious valid range: field -> (check, what it must be).
RANGES: dict[str, tuple[Any, str]] = {
    "rounds": (lambda v: v >= 0, ">= 0"),
    "seeds": (lambda v: v >= 1, ">= 1"),
    "curvature.sigma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "curvature.examples_per_domain": (lambda v: v >= 0 and v == int(v), "an integer >= 0"),
    "data.max_examples_per_domain": (lambda v: v >= 0 and v == int(v), "an integer >= 0"),
    "data.demo_pool_factor": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "curvature.max_examples_per_domain": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "curvature.alpha_se_target": (lambda v: v > 0, "> 0"),
    "curvature.damping": (lambda v: v >= 0, ">= 0"),
    "curvature.prefix_cache_gib": (lambda v: v >= 0, ">= 0"),
    "curvature.keep_captures_gib": (lambda v: v >= 0, ">= 0"),
    "influence.cg_tol": (lambda v: v > 0, "> 0"),
    "influence.cg_max_iters": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "daar.select_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
}

_INT = lambda v: v == int(v)  # noqa: E731
# Training, batching, evaluation and mesh fields: a negative learning rate or a zero batch size
# used to start the run (and fail, or train nothing, later). Every RANGES value must be finite.
RANGES.update(
    {
        "train.epochs": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "train.batch_size": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "train.seq_len": (lambda v: v >= 2 and _INT(v), "an integer >= 2"),
        "train.grad_accum": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "train.learning_rate": (lambda v: v > 0, "> 0"),
        "train.warmup_steps": (lambda v: v >= 0 and _INT(v), "an integer >= 0"),
        "train.end_lr_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "train.weight_decay": (lambda v: v >= 0, ">= 0"),
        "train.b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "train.b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "train.grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
        "train.log_every": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "train.checkpoint_every": (lambda v: v >= 0 and _INT(v), "an integer >= 0"),
        "train.keep_checkpoints": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "data.max_len": (lambda v: v >= 2 and _INT(v), "an integer >= 2"),
        "data.demo_n_test": (lambda v: v >= 0 and _INT(v), "an integer >= 0"),
        "data.demo_n_ref": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "curvature.batch_size": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "influence.batch_size": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "eval.batch_size": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "eval.max_new_tokens": (lambda v: v >= 1 and _INT(v), "an integer >= 1"),
        "eval.limit": (lambda v: v >= 0 and _INT(v), "an integer >= 0 (0: all)"),
        **{
            f"mesh.{axis}": (lambda v: (v == -1 or v >= 1) and _INT(v), "-1 (the rest) or >= 1")
            for axis in ("data", "fsdp", "tensor")
        },
    }
)


def get_field(cfg: Any, dotted: str) -> Any:
    """cfg's field `dotted` ("train.seed"), or MISSING."""
    node = cfg
    for name in dotted.split("."):
        try:
            node = node[name]
        except (KeyError, TypeError, AttributeError):
            return MISSING
    return node


def validate_config(cfg: ml_collections.ConfigDict | dict) -> None:
    """Check the enumerated and numeric fields of CHOICES and RANGES and the fields that must
    agree; raise InputError naming the field and what it allows.

    Fields a config does not have are skipped (library users may pass partial configs). The
    typed sections check themselves when built (ideal_jax/stages.py builds them all).
    """
    check_fields(cfg, CHOICES, RANGES)
    _check_cross_fields(cfg)


def check_fields(cfg, choices: dict[str, tuple], ranges: dict[str, tuple[Any, str]]) -> None:
    """Every field of `choices` one of its values, every field of `ranges` a finite number that
    passes its check (fields `cfg` does not have are skipped); InputError naming the field."""
    for field, allowed in choices.items():
        value = get_field(cfg, field)
        if value is not MISSING and value not in allowed:
            raise InputError(
                f"{value!r} is not allowed; allowed: {', '.join(allowed)}", field=field
            )
    for field, (check, what) in ranges.items():
        value = get_field(cfg, field)
        if value is MISSING:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not check(value)
        ):
            raise InputError(f"must be {what}, got {value!r}", field=field)


def _check_cross_fields(cfg) -> None:
    """Fields that are valid alone but not together."""
    max_len, seq_len = get_field(cfg, "data.max_len"), get_field(cfg, "train.seq_len")
    if MISSING not in (max_len, seq_len) and max_len > seq_len:
        raise InputError(
            f"must be <= train.seq_len ({seq_len}): an example of max_len={max_len} tokens "
            "would not fit a training row",
            field="data.max_len",
        )
    mesh = [get_field(cfg, f"mesh.{axis}") for axis in MESH_AXES]
    if mesh.count(-1) > 1:
        second = MESH_AXES[[i for i, v in enumerate(mesh) if v == -1][1]]
        raise InputError(
            "at most one mesh axis may be -1 (all remaining devices)", field=f"mesh.{second}"
        )


def section_fields(
    section: Any, cls: type, name: str, *, exclude: tuple[str, ...] = (), overrides=None
) -> dict[str, Any]:
    """The config section `name` as a plain dict (plus `overrides`), checked to hold every field
    of dataclass `cls` but `exclude`: the first missing one is an InputError naming it (library
    dataclasses have no defaults of their own; configs/common.py defines them all)."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    values |= overrides or {}
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    missing = [f for f in fields if f not in values]
    if missing:
        raise InputError(
            f"cfg.{name} has no field {missing[0]!r} (configs/common.py's base_config() defines "
            f"every {name} field; start the config from it)",
            field=f"{name}.{missing[0]}",
        )
    return values
