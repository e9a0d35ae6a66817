"""Provenance of a run's artifacts: what produced each one, checked before it is reused.

Every artifact the loop caches (mixture.json, influence.json, eval.json, reweight.json, and the
train/ directory of each round) gets an entry in its directory's `provenance.json`:

    {"influence.json": {"inputs": {"config": …, "data": …, "mixture": …}, "sha256": …}, …}

`inputs` are fingerprints of what the artifact depends on: the config (the fields that change
results, `fields.fingerprint`), the training and reference data as tokenized (ids, tokens and
loss masks of every example), and the artifacts upstream of it (the round's mixture.json, the
influence.json a step was computed from). `sha256` is the artifact's own content. A cached artifact
is reused only when both match: otherwise the run stops with exit 2, saying which input changed
(or that the file was edited), and leaves everything as it is. So a workdir whose config.json was
deleted cannot lend its artifacts to another config, edited data is noticed, and a hand-edited
influence.json is not trusted. A rerun checks every recorded artifact of the workdir first
(`check_unmodified`, listing each edited one), so a finished run whose rounds are all skipped
does not report from an edited file either, and refuses fewer rounds than it holds
(`check_extent`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from ideal_jax.configlib.fields import RESUMABLE_FIELDS, fingerprint, flat_fields
from ideal_jax.utils import distributed
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError

RECORD = "provenance.json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_fingerprint(suite) -> str:
    """SHA-256 over every tokenized training and reference example (domain, id, tokens, mask)."""
    h = hashlib.sha256()
    groups = [(name, suite.tokenized[name]) for name in sorted(suite.tokenized)]
    groups.append(("<reference>", suite.reference_tokenized))
    for name, items in groups:
        h.update(f"\0domain {name} {len(items)}\0".encode())
        for t in items:
            h.update(f"{t.domain}\0{t.example_id}\0".encode())
            h.update(t.input_ids.astype("<i4").tobytes())
            h.update(t.loss_mask.astype("u1").tobytes())
    return h.hexdigest()[:16]


def run_inputs(cfg, suite) -> dict[str, str]:
    """The inputs every artifact of the run depends on."""
    return {"config": fingerprint(cfg), "data": data_fingerprint(suite)}


def _record_path(path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), RECORD)


def _read_record(path: str) -> dict[str, Any]:
    rpath = _record_path(path)
    if not os.path.exists(rpath):
        return {}
    try:
        with open(rpath) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"unreadable provenance record ({e})", path=rpath) from None


def _content_sha(path: str) -> str | None:
    return file_sha256(path) if os.path.isfile(path) else None


def record(path: str, inputs: Mapping[str, str]) -> None:
    """Note that `path` (a file, or a directory whose content is verified elsewhere) was produced
    from `inputs`; written atomically by the lead host."""
    if not distributed.is_lead_host():
        return
    entries = _read_record(path)
    entries[os.path.basename(os.path.normpath(path))] = {
        "inputs": dict(inputs),
        "sha256": _content_sha(path),
    }
    write_json_atomic(_record_path(path), entries)


def check(path: str, inputs: Mapping[str, str]) -> None:
    """InputError unless `path` was produced from `inputs` and is unchanged since."""
    name = os.path.basename(os.path.normpath(path))
    entry = _read_record(path).get(name)
    if entry is None:
        raise InputError(
            f"{name} has no provenance record (written by another version or by hand); "
            "use a new --workdir",
            path=path,
        )
    changed = sorted(
        k
        for k in set(inputs) | set(entry.get("inputs", {}))
        if entry["inputs"].get(k) != inputs.get(k)
    )
    if changed:
        raise InputError(
            f"{name} was produced from other inputs: {', '.join(changed)} changed since it was "
            "written; use a new --workdir (or delete it and what follows it to recompute)",
            path=path,
            field=changed[0],
        )
    if entry.get("sha256") is not None and entry["sha256"] != _content_sha(path):
        raise InputError(
            f"{name} was modified after it was written (its SHA-256 no longer matches "
            f"{RECORD}); it is not trusted — restore it or use a new --workdir",
            path=path,
        )


def reuse(path: str, inputs: Mapping[str, str]) -> bool:
    """True when `path` exists and may be reused (checked); False when it does not exist."""
    if not os.path.exists(path):
        return False
    check(path, inputs)
    return True


def with_upstream(inputs: Mapping[str, str], **artifacts: str) -> dict[str, str]:
    """`inputs` plus the content fingerprint of each upstream artifact (name=path)."""
    out = dict(inputs)
    for name, path in artifacts.items():
        out[name] = file_sha256(path)[:16] if os.path.isfile(path) else "absent"
    return out


# The config sections (or single fields) each stage's artifacts depend on. An artifact is reused
# only if these are unchanged, so a new field in another section (e.g. cfg.daar) does not
# invalidate a finished IDEAL round. Upstream artifacts (the mixture, the influence.json a step
# was computed from) enter through their content fingerprints (`with_upstream`).
_TRAINED = ("seed", "data", "model", "mesh", "train")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "mixture": ("seed", "data", "reweight.keep_total"),
    "train": _TRAINED,
    "eval": (*_TRAINED, "eval", "influence.batch_size"),
    "eval_base": ("seed", "data", "model", "mesh", "eval", "influence.batch_size", "train.seq_len"),
    "influence": (*_TRAINED, "curvature", "influence"),
    "reweight": (*_TRAINED, "curvature", "influence", "reweight"),
    "daar": ("seed", "data", "model", "mesh", "daar"),
    "compare": (*_TRAINED, "eval", "influence.batch_size", "compare"),
}


# Fields added to a section after workdirs were written, with the value under which a run does
# what the runs made before the field existed did: at that value a field is left out of its
# section's fingerprint, so the finished stages of an older workdir are still reused
# (tests/test_config_evolution.py). Fine-tuning types (train.finetuning, issue 29): a full
# fine-tune reads none of the others.
ADDED_FIELDS: dict[str, Any] = {
    "train.finetuning": "full",
    "train.freeze_trainable_layers": 2,
    "train.prefix_cache": True,
    "train.prefix_cache_gib": 2.0,
    "train.lora_rank": 8,
    "train.lora_alpha": 16.0,
    "train.lora_targets": "all",
    # The α-error subsample budget (issue 28): older runs set examples_per_domain to 0 (σ), which
    # still means σ whatever these say. (An older run with a fixed examples_per_domain > 0 resumes
    # with the α-error budget for the rounds it has not finished: set subsample = "fixed" to keep
    # its fixed budget.)
    "curvature.subsample": "alpha_se",
    "curvature.max_examples_per_domain": 512,
    "curvature.alpha_se_target": 0.2,
}
_ABSENT = object()


def stage_inputs(cfg, stage: str, data: str) -> dict[str, str]:
    """{"config.<section>": fingerprint, ..., "data": data} for an artifact of `stage` (fields
    that never change results, RESUMABLE_FIELDS, and ADDED_FIELDS at their old-behaviour value
    left out)."""
    flat = flat_fields(cfg)
    out = {}
    for section in STAGE_SECTIONS[stage]:
        chosen = {
            k: v
            for k, v in flat.items()
            if (k == section or k.startswith(section + "."))
            and k not in RESUMABLE_FIELDS
            and ADDED_FIELDS.get(k, _ABSENT) != v
        }
        digest = hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()
        out[f"config.{section}"] = digest[:12]
    out["data"] = data
    return out


# --- a rerun of an existing workdir: its recorded artifacts, and the extent it was run to ---

# Directories that hold no provenance records (checkpoints, exported models, the demo suite).
_UNRECORDED_DIRS = ("checkpoints", "final_model", "hf_model", "demo_data")


def modified_artifacts(workdir: str) -> list[str]:
    """Every artifact under `workdir` whose content no longer matches the SHA-256 its directory's
    provenance.json recorded (relative paths, sorted). A recorded artifact that was deleted is
    not listed: deleting one is how a user asks for it to be recomputed."""
    out = []
    for base, dirs, files in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if d not in _UNRECORDED_DIRS and not d.startswith("."))
        if RECORD not in files:
            continue
        entries = _read_record(os.path.join(base, RECORD))
        for name, entry in sorted(entries.items()):
            path = os.path.join(base, name)
            recorded = entry.get("sha256") if isinstance(entry, dict) else None
            if recorded is not None and os.path.isfile(path) and file_sha256(path) != recorded:
                out.append(os.path.relpath(path, workdir))
    return out


def check_unmodified(workdir: str) -> None:
    """InputError listing every artifact of `workdir` edited since it was written (checked when
    a workdir is reused, before anything is read from it or reported)."""
    modified = modified_artifacts(workdir)
    if not modified:
        return
    if len(modified) == 1:
        what, it, subject, was = modified[0], "it", "it", "was"
    else:
        what = f"{len(modified)} artifacts ({', '.join(modified)})"
        it, subject, was = "them", "they", "were"
    raise InputError(
        f"{what} {was} modified after {subject} {was} written (SHA-256 no longer matches "
        f"{RECORD}); not trusted — restore {it}, delete {it} (and what follows) to recompute, "
        "or use a new --workdir",
        path=os.path.join(workdir, modified[0]),
    )


def check_extent(workdir: str, rounds: int) -> None:
    """InputError naming `rounds` when `workdir` already went past round `rounds`: a rerun with
    fewer rounds would rewrite final_mixture.jsonl, summary.json and round_K/row.json for the
    shorter run while final_model/ and the later rounds stay the longer run's."""
    done = []
    for name in os.listdir(workdir) if os.path.isdir(workdir) else []:
        k = name.removeprefix("round_")
        if name.startswith("round_") and k.isdigit():
            done.append(int(k))
    last = max(done, default=-1)
    stepped = False  # round `rounds` already took its step towards round `rounds` + 1
    row = os.path.join(workdir, f"round_{rounds}", "row.json")
    if os.path.isfile(row):
        try:
            with open(row) as f:
                stepped = bool(json.load(f).get("step"))
        except (OSError, json.JSONDecodeError, AttributeError):
            stepped = False
    if last > rounds or stepped:
        raise InputError(
            f"this workdir already holds round_{last} (a run of more rounds); rounds={rounds} "
            "would rewrite its final_mixture.jsonl, summary.json and row.json for the shorter "
            f"run while final_model/ stays the longer run's; use rounds >= {last}, or a new "
            "--workdir",
            path=workdir,
            field="rounds",
        )
