"""The training domains and the reference set from their sources: `{name: path}`, one file whose
records carry a domain (capability) field, or a LLaMA-Factory `dataset_info.json`
(ideal_jax/data/dataset_info.py). Files are read by ideal_jax/data/sources.py and their records
normalized by ideal_jax/data/records.py."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ideal_jax.data import dataset_info
from ideal_jax.data.records import ALL_ROW, Example, RawRecord, check_unicode, normalize_all
from ideal_jax.data.sources import read_records
from ideal_jax.utils.errors import InputError


def _warn_same_content(sources: Mapping[str, str | os.PathLike]) -> None:
    """Warn when two domain names read the same file, or files with identical bytes."""
    import hashlib

    from absl import logging

    seen: dict[str, str] = {}
    for name, path in sources.items():
        path = os.fspath(path)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                key = hashlib.sha256(f.read()).hexdigest()
        else:
            key = os.path.realpath(path)
        if key in seen:
            logging.warning(
                "domains %r and %r have the same content (%s): the data counts twice",
                seen[key],
                name,
                path,
            )
        seen.setdefault(key, name)


def load_domains(
    sources: Mapping[str, str | os.PathLike] | str | os.PathLike,
    *,
    domain_names: Sequence[str] | None = None,
    field_map: Mapping[str, str] | None = None,
    group_field: str = "domain",
) -> dict[str, list[Example]]:
    """Loads training domains: `{domain: path}` or one path whose records carry `group_field`.

    `domain_names` (from the config) fixes the order of the result; with a single source every
    record's domain must be one of them, and each named domain must have records.
    """
    if domain_names is not None:
        repeated = sorted({d for d in domain_names if list(domain_names).count(d) > 1})
        if repeated:
            raise InputError(
                f"domain names {repeated} appear more than once (they would merge into one domain)",
                field="data.domain_names",
            )
    if isinstance(sources, Mapping):
        _warn_same_content(sources)
        if domain_names is not None:
            unknown = [d for d in domain_names if d not in sources]
            if unknown:
                raise InputError(
                    f"unknown domain names {unknown}; sources name {sorted(sources)}",
                    field="domains",
                )
        names = list(domain_names) if domain_names is not None else list(sources)
        result = {}
        for name in names:
            path = os.fspath(sources[name])
            raw = read_records(path)
            if not raw:
                raise InputError(f"domain {name!r} is empty", path=path)
            result[name] = normalize_all(((name, r) for r in raw), path, field_map)
        return result
    if dataset_info.is_dataset_info(sources):  # LLaMA-Factory: its entries are the domains
        return dataset_info.load_entries(sources, domain_names, field_map=field_map)
    return _load_grouped(os.fspath(sources), domain_names, field_map, group_field, "domain")


def load_reference(
    sources: Mapping[str, str | os.PathLike] | str | os.PathLike,
    *,
    capability_names: Sequence[str] | None = None,
    field_map: Mapping[str, str] | None = None,
    group_field: str = "capability",
) -> dict[str, list[Example]]:
    """Loads the reference set grouped by capability (one file per capability, or a field)."""
    if isinstance(sources, Mapping):
        grouped = load_domains(sources, domain_names=capability_names, field_map=field_map)
        _check_capability_names(grouped, path=None, field="data.reference")
        return {
            cap: [dataclasses.replace(ex, capability=cap) for ex in exs]
            for cap, exs in grouped.items()
        }
    if dataset_info.is_dataset_info(sources):
        grouped = dataset_info.load_entries(
            sources, capability_names, field_map=field_map, kind="capability"
        )
    else:
        grouped = _load_grouped(
            os.fspath(sources), capability_names, field_map, group_field, "capability"
        )
    _check_capability_names(grouped, path=os.fspath(sources), field=group_field)
    return {
        cap: [dataclasses.replace(ex, capability=cap) for ex in exs] for cap, exs in grouped.items()
    }


def _check_capability_names(grouped: Mapping[str, Any], *, path: str | None, field: str) -> None:
    """α's rows are "all" (the whole reference set) and then each capability: a capability named
    "all" beside others would take the whole set's row name."""
    if ALL_ROW in grouped and len(grouped) > 1:
        raise InputError(
            f"capability name {ALL_ROW!r} is reserved (α's row for the whole reference set) "
            "when there are other capabilities; rename it",
            path=path,
            field=field,
        )


def _load_grouped(
    path: str,
    names: Sequence[str] | None,
    field_map: Mapping[str, str] | None,
    group_field: str,
    kind: str,
) -> dict[str, list[Example]]:
    raw = read_records(path)
    if not raw:
        raise InputError("source is empty", path=path)
    key = (field_map or {}).get(group_field, group_field)
    groups: dict[str, list[RawRecord]] = {}
    for location, record in raw:
        group = record.get(key)
        if not isinstance(group, str) or not group.strip():
            kind_of = "missing" if group is None else f"not a non-empty string ({group!r})"
            raise InputError(f"{kind} name is {kind_of}", path=path, record=location, field=key)
        check_unicode(group, where={"path": path, "record": location}, field=key)
        if names is not None and group not in names:
            raise InputError(
                f"unknown {kind} {group!r}; configured: {list(names)}",
                path=path,
                record=location,
                field=key,
            )
        groups.setdefault(group, []).append((location, record))
    order = list(names) if names is not None else sorted(groups)
    result = {}
    for name in order:
        if name not in groups:
            raise InputError(f"{kind} {name!r} is empty (no records name it)", path=path, field=key)
        result[name] = normalize_all(((name, r) for r in groups[name]), path, field_map)
    return result
