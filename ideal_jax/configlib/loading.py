"""Loading a config file (`configs/NAME.py[:ARG]`, as `--config` takes it) and deriving one
config from another."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from ideal_jax.configlib.checks import validate_config
from ideal_jax.utils.errors import InputError


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
