"""ml_collections helpers: validate, resolve, serialise and fingerprint configs; guard workdirs.

A run writes its resolved config to DIR/config.json. Rerunning on the same DIR resumes, but only if
the config is the same one (fields that do not change results, such as logging cadence, may differ);
otherwise the run stops before touching anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from typing import Any

import ml_collections

from ideal_jax.utils.errors import InputError

# Fields that may change between a run and its resumption without invalidating finished work.
RESUMABLE_FIELDS = (
    "rounds",
    "seeds",  # every seed has its own directory (seed_S/); more seeds add directories
    "compare.methods",  # every method has its own directories; adding one adds them
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "eval.batch_size",
    "progress",
    "export.final_model",  # exports read finished artifacts; they never change them
    "export.round",
    "export.dtype",
)


# Enumerated fields and every value the code accepts (the modules named check them again, later).
# `validate_config` checks them when a config is loaded, before any work or any file is written;
# tests/test_configs.py keeps this table equal to the modules' own lists.
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
    "reweight.rule": ("paper", "optax", "outer"),  # reweight.py
    "reweight.policy": ("trust_region", "fixed"),  # step_policy.py
    "reweight.accept_on": ("reference_loss", "dev_score"),  # step_policy.py
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
    "curvature.damping": (lambda v: v >= 0, ">= 0"),
    "curvature.prefix_cache_gib": (lambda v: v >= 0, ">= 0"),
    "influence.cg_tol": (lambda v: v > 0, "> 0"),
    "influence.cg_max_iters": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "reweight.step_size": (lambda v: v > 0, "> 0"),
    "reweight.step_min": (lambda v: v > 0, "> 0"),
    "reweight.step_max": (lambda v: v > 0, "> 0"),
    "reweight.widen": (lambda v: v >= 1, ">= 1"),
    "reweight.shrink": (lambda v: 0 < v < 1, "in (0, 1)"),
    "reweight.learning_rate": (lambda v: v > 0, "> 0"),
    "reweight.outer_learning_rate": (lambda v: v > 0, "> 0"),
    "reweight.outer_steps": (lambda v: v >= 1, ">= 1"),
    "reweight.significance_z": (lambda v: v >= 0, ">= 0"),
    "reweight.beta_min": (lambda v: -1 <= v <= 0, "in [-1, 0] (β = -1 empties a domain)"),
    "reweight.beta_max": (lambda v: v >= 0, ">= 0"),
    "daar.select_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "compare.k": (lambda v: v >= 2 and v == int(v), "an integer >= 2"),
    "compare.dirichlet_concentration": (lambda v: v > 0, "> 0"),
    "compare.regmix_candidates": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "compare.regmix_top": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "compare.doremi_eta": (lambda v: v > 0, "> 0"),
    "compare.doremi_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
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
        "reweight.min_volume": (lambda v: v >= 0 and _INT(v), "an integer >= 0"),
        **{
            f"mesh.{axis}": (lambda v: (v == -1 or v >= 1) and _INT(v), "-1 (the rest) or >= 1")
            for axis in ("data", "fsdp", "tensor")
        },
    }
)


def resolve_config_path(value: str) -> str:
    """`configs/NAME.py[:ARG]` relative to the current directory or, failing that, to the
    installed `configs` package (so the README's command works from any directory)."""
    path, sep, arg = value.partition(":")
    if not path or os.path.isabs(path) or os.path.exists(path):
        return value
    import importlib.util

    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return value
    package_dir = list(spec.submodule_search_locations)[0]
    for candidate in (
        os.path.join(os.path.dirname(package_dir), path),  # configs/NAME.py
        os.path.join(package_dir, path),  # NAME.py
    ):
        if os.path.isfile(candidate):
            return candidate + sep + arg
    return value


def load_config_spec(value: str) -> ml_collections.ConfigDict:
    """The config `configs/NAME.py[:ARG]` names (as `--config` takes it; for benchmarks and
    notebooks), resolved as `resolve_config_path` does and validated."""
    import importlib.util

    path, _, arg = resolve_config_path(value).partition(":")
    if not os.path.isfile(path):
        raise InputError(f"no config file {path!r}", field="config")
    module_spec = importlib.util.spec_from_file_location("ideal_jax_config_file", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    validate_config(cfg)
    return cfg


_MISSING = object()

# The methods mode=compare knows (ideal_jax/compare/run.py runs them in this order).
COMPARE_METHODS = ("ideal", "d0", "uniform", "random", "regmix", "doremi", "ideal_paper")


def parse_compare_methods(cfg) -> tuple[str, ...]:
    """cfg.compare.methods ("ideal,uniform,...") in COMPARE_METHODS order, with d0 (the pairing
    base); InputError naming an unknown method."""
    names = [m.strip() for m in str(cfg.compare.methods).split(",") if m.strip()]
    unknown = [m for m in names if m not in COMPARE_METHODS]
    if unknown or not names:
        raise InputError(
            (f"unknown method {unknown[0]!r}" if unknown else "no method named")
            + f"; allowed: {', '.join(COMPARE_METHODS)} (comma-separated)",
            field="compare.methods",
        )
    return tuple(m for m in COMPARE_METHODS if m in names or m == "d0")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for name in dotted.split("."):
        try:
            node = node[name]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def validate_config(cfg: ml_collections.ConfigDict | dict) -> None:
    """Check enumerated and numeric fields; raise InputError naming the field and what it allows.

    Fields a config does not have are skipped (library users may pass partial configs).
    """
    for field, allowed in CHOICES.items():
        value = _get(cfg, field)
        if value is not _MISSING and value not in allowed:
            raise InputError(
                f"{value!r} is not allowed; allowed: {', '.join(allowed)}", field=field
            )
    for field in ("reweight.optimizer", "reweight.outer_optimizer"):
        optimizer = _get(cfg, field)
        if optimizer is _MISSING:
            continue
        import optax

        if not (isinstance(optimizer, str) and callable(getattr(optax, optimizer, None))):
            raise InputError(
                f"{optimizer!r} is not an optax optimizer; allowed: the name of one, "
                "e.g. sgd, adam, adamw",
                field=field,
            )
    if _get(cfg, "compare.methods") is not _MISSING:
        parse_compare_methods(cfg)
    if _get(cfg, "reweight.policy") == "trust_region":  # the step bounds' order
        lo, m, hi = (_get(cfg, f"reweight.{f}") for f in ("step_min", "step_size", "step_max"))
        if all(isinstance(v, int | float) for v in (lo, m, hi)) and not lo <= m <= hi:
            raise InputError(
                f"the step bounds are out of order: need step_min ({lo}) <= step_size ({m}) "
                f"<= step_max ({hi})",
                field=f"reweight.{'step_max' if m > hi else 'step_min'}",
            )
    for field, (check, what) in RANGES.items():
        value = _get(cfg, field)
        if value is _MISSING:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not check(value)
        ):
            raise InputError(f"must be {what}, got {value!r}", field=field)
    _check_cross_fields(cfg)


def _check_cross_fields(cfg) -> None:
    """Fields that are valid alone but not together."""
    max_len, seq_len = _get(cfg, "data.max_len"), _get(cfg, "train.seq_len")
    if _MISSING not in (max_len, seq_len) and max_len > seq_len:
        raise InputError(
            f"must be <= train.seq_len ({seq_len}): an example of max_len={max_len} tokens "
            "would not fit a training row",
            field="data.max_len",
        )
    mesh = [_get(cfg, f"mesh.{axis}") for axis in MESH_AXES]
    if mesh.count(-1) > 1:
        second = MESH_AXES[[i for i, v in enumerate(mesh) if v == -1][1]]
        raise InputError(
            "at most one mesh axis may be -1 (all remaining devices)", field=f"mesh.{second}"
        )


MESH_AXES = ("data", "fsdp", "tensor")  # ideal_jax/sharding.py


def check_machine(cfg, device_count: int, process_count: int = 1) -> None:
    """The config against the devices it runs on (jax.device_count(), after the distributed
    runtime starts): the mesh must use them all, and a training batch must split into
    grad_accum microbatches whose rows divide over the mesh's data x fsdp devices. InputError
    naming the field, before the workdir is created."""
    mesh = {axis: _get(cfg, f"mesh.{axis}") for axis in MESH_AXES}
    if _MISSING in mesh.values() or _get(cfg, "mode") == "export":  # export uses no mesh
        return
    shape = ", ".join(f"{a}={v}" for a, v in mesh.items())
    explicit = [a for a, v in mesh.items() if v not in (-1, 1)] or ["data"]
    known = math.prod(v for v in mesh.values() if v != -1)
    hint = "set one axis to -1 to use all of them (e.g. --config.mesh.data=-1)"
    if -1 in mesh.values():
        if device_count % known:
            raise InputError(
                f"mesh ({shape}) cannot use the {device_count} devices of this machine: "
                f"{known} does not divide {device_count}",
                field=f"mesh.{explicit[0]}",
            )
        mesh[next(a for a, v in mesh.items() if v == -1)] = device_count // known
    elif known != device_count:
        raise InputError(
            f"mesh ({shape}) needs {known} devices, this machine has {device_count}; {hint}",
            field=f"mesh.{explicit[0]}",
        )
    batch, accum = _get(cfg, "train.batch_size"), _get(cfg, "train.grad_accum")
    if _MISSING in (batch, accum) or _get(cfg, "mode") not in ("ideal", "sft", "compare"):
        return
    divisor = mesh["data"] * mesh["fsdp"]
    if batch % accum or (batch // accum) % divisor:
        raise InputError(
            f"{batch} rows must split into grad_accum={accum} microbatches whose rows divide "
            f"evenly over the mesh's data x fsdp = {divisor} devices",
            field="train.batch_size",
        )
    if batch % process_count:
        raise InputError(
            f"{batch} rows are not a multiple of the {process_count} processes",
            field="train.batch_size",
        )


# Config fields that name local files or directories (a dict field: each of its values), with
# the modes and settings that read them.
PATH_FIELDS = (
    "data.domains",
    "data.source",
    "data.reference",
    "data.reference_source",
    "data.tokenizer",
    "model.path",
    "daar.pool",
    "daar.probe",
    "daar.seed_pairs",
)


def check_paths(cfg) -> None:
    """Every file or directory the config names exists (InputError naming the field), so a typo
    in a path stops the run before its workdir exists, not after the model is loaded."""
    if _get(cfg, "mode") == "export":
        return
    reads_daar = _get(cfg, "mode") == "daar" or _get(cfg, "daar.use_for_ideal") is True
    named: list[tuple[str, Any]] = []
    for field in PATH_FIELDS:
        if field.startswith("data.") and _get(cfg, "data.demo") is True:
            continue  # the demo suite is built into the workdir: these are not read
        if field.startswith("daar.") and not reads_daar:
            continue
        if field == "daar.seed_pairs" and (
            _get(cfg, "daar.generator") != "file" or _get(cfg, "daar.seed_pairs") == "demo"
        ):
            continue  # "demo": the demo suite's pairs, written into the workdir
        value = _get(cfg, field)
        if hasattr(value, "items"):
            named += [(f"{field}.{key}", path) for key, path in value.items()]
        elif value is not _MISSING:
            named.append((field, value))
    tasks = _get(cfg, "eval.tasks")
    if hasattr(tasks, "items"):
        for name, task in tasks.items():
            if hasattr(task, "get"):
                named.append((f"eval.tasks.{name}.path", task.get("path")))
    for field, path in named:
        if isinstance(path, str) and path and not os.path.exists(path):
            raise InputError(f"no such file or directory: {path}", field=field)


def section_fields(
    section: Any, cls: type, name: str, *, exclude: tuple[str, ...] = (), overrides=None
) -> dict[str, Any]:
    """The config section `name` as a plain dict (plus `overrides`), checked to hold every field
    of dataclass `cls` but `exclude`: the first missing one is an InputError naming it (library
    dataclasses have no defaults of their own; configs/common.py defines them all)."""
    import dataclasses

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


def derived(cfg: ml_collections.ConfigDict, changes: dict[str, Any]) -> ml_collections.ConfigDict:
    """A locked copy of `cfg` with the dotted fields of `changes` set ({"train.seed": 3})."""
    out = type(cfg)(cfg.to_dict())  # an unlocked copy
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node[name]
        node[leaf] = value
    return out.lock()


def to_dict(cfg: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def to_json(cfg: ml_collections.ConfigDict | dict) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True, default=str)


def flat_fields(cfg: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{"train.learning_rate": 0.01, ...}: every leaf field of the config, as JSON values."""
    return _flatten(json.loads(to_json(cfg)))


def fingerprint(cfg: ml_collections.ConfigDict | dict, ignore=RESUMABLE_FIELDS) -> str:
    flat = {k: v for k, v in _flatten(json.loads(to_json(cfg))).items() if k not in ignore}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON through a temporary file and an atomic rename: readers never see half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: the old file stays, the partial one goes
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):  # numpy and jax arrays
        return np.asarray(obj).tolist()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return str(obj)


def check_same_config(
    path: str, current: dict, ignore: tuple, advice: str, defaults: dict | None = None
) -> dict:
    """The config stored at `path`; InputError (naming the first differing fields) unless it
    equals `current` outside the `ignore`d fields.

    defaults: flat {field: default}; a field the stored config does not have (added to the
    package after the run was made) counts as equal when its current value is that default.
    """
    try:
        with open(path) as f:
            previous = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"existing config is not valid JSON ({e})", path=path) from None
    old, new = _flatten(previous), _flatten(current)
    defaults = defaults or {}
    differ = sorted(
        k
        for k in set(old) | set(new)
        if k not in ignore
        and old.get(k, _MISSING) != new.get(k, _MISSING)
        and not (k not in old and k in defaults and new.get(k) == defaults[k])
    )
    if differ:
        raise InputError(
            "this workdir was created by a different config (differing fields: "
            f"{', '.join(differ[:8])}); {advice}",
            path=path,
            field=differ[0],
        )
    return previous


def default_fields() -> dict[str, Any]:
    """Every field's default (configs/common.py base_config), flat; {} if configs is absent."""
    try:
        from configs import common
    except ImportError:
        return {}
    return flat_fields(common.base_config())


def prepare_workdir(cfg: ml_collections.ConfigDict, workdir: str) -> bool:
    """Create DIR and write DIR/config.json, or check that an existing DIR holds the same config.

    Returns True when resuming. Raises InputError (nothing written) if DIR was created by a
    different config, naming the first fields that differ.
    """
    path = os.path.join(workdir, "config.json")
    current = json.loads(to_json(cfg))
    if os.path.exists(path):
        previous = check_same_config(
            path,
            current,
            RESUMABLE_FIELDS,
            "use a new --workdir or the original config",
            defaults=default_fields(),
        )
        if previous != current:  # resumable fields (e.g. rounds) changed; else write nothing
            write_json_atomic(path, current)
        return True
    from ideal_jax.utils.workdir_lock import check_workdir

    check_workdir(workdir)  # InputError if DIR is a file or cannot be created
    write_json_atomic(path, current)
    return False
