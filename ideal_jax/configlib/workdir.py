"""The workdir guard: DIR/config.json is written once, and a rerun on DIR resumes only with the
same config (fields that do not change results, such as logging cadence, may differ);
otherwise the run stops before touching anything."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from ideal_jax.configlib.fields import RESUMABLE_FIELDS, flatten, to_json
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError

_MISSING = object()


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
    old, new = flatten(previous), flatten(current)
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


def prepare_workdir(
    cfg: ml_collections.ConfigDict, workdir: str, *, defaults: dict[str, Any] | None = None
) -> bool:
    """Create DIR and write DIR/config.json, or check that an existing DIR holds the same config.

    Returns True when resuming. Raises InputError (nothing written) if DIR was created by a
    different config, naming the first fields that differ. defaults: every field's default, flat
    (the entry point passes configs/common.py's: ideal_jax/main.py `default_fields`); a field
    an older DIR/config.json lacks counts as unchanged at its default.
    """
    path = os.path.join(workdir, "config.json")
    current = json.loads(to_json(cfg))
    if os.path.exists(path):
        previous = check_same_config(
            path,
            current,
            RESUMABLE_FIELDS,
            "use a new --workdir or the original config",
            defaults=defaults,
        )
        if previous != current:  # resumable fields (e.g. rounds) changed; else write nothing
            write_json_atomic(path, current)
        return True
    from ideal_jax.utils.workdir_lock import check_workdir

    check_workdir(workdir)  # InputError if DIR is a file or cannot be created
    write_json_atomic(path, current)
    return False
