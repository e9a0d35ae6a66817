"""Orbax checkpoints of the TrainState plus the data-iterator position.

Layout: `<directory>/<step>/{state,meta}`; `state` is the TrainState pytree (sharded arrays, every
host writes its own shards), `meta` a small JSON dict (epoch, step in epoch, steps per epoch, ...).
Saves are atomic (orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest) and asynchronous by default (the
device-to-host copy happens before `save` returns, so the caller may donate the state right after).

Restoring goes onto the shardings of an abstract target, after checking every parameter's stored
shape against the model config: a mismatch is an InputError naming the checkpoint and parameter.

Verification. Once a save is committed, the SHA-256 of every file of the step is recorded in
`<directory>.digests/<step>.json` (by process 0; at the next save, `wait` or `close`).
`restore_latest` checks a step's files against it before restoring; a step whose files changed,
went missing or fail to restore is moved aside to `<directory>.damaged/` (never deleted) with a
warning, and the next older step is tried. When steps exist but none is valid, an InputError
names the directory.
A step killed after its commit but before its digest was written has no digest and is restored
unverified (a warning says so).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ideal_jax.provenance import file_sha256
from ideal_jax.train.state import TrainState
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError

# Orbax names an unfinished save "<step>.orbax-checkpoint-tmp" (then renames it to "<step>").
TMP_MARKER = ".orbax-checkpoint-tmp"


def _abstract_with_shardings(abstract_state: TrainState, shardings: TrainState) -> TrainState:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


class Checkpointer:
    """Periodic, atomic, keep-last-N checkpoints of a TrainState and its data position."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int,
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        _remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep else None,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_handlers=_handlers(), options=options
        )

    # -- verification ------------------------------------------------------------------------
    @property
    def digest_dir(self) -> str:
        return self.directory + ".digests"

    def _digest_path(self, step: int) -> str:
        return os.path.join(self.digest_dir, f"{step}.json")

    def record_digests(self) -> None:
        """Digest every committed step that has none yet; forget digests of deleted steps."""
        if jax.process_index() != 0:
            return
        steps = set(self.manager.all_steps())
        os.makedirs(self.digest_dir, exist_ok=True)
        for step in steps:
            committed = os.path.isdir(self.step_path(step))
            if committed and not os.path.exists(self._digest_path(step)):
                write_json_atomic(self._digest_path(step), file_digests(self.step_path(step)))
        for name in os.listdir(self.digest_dir):
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) not in steps:
                os.remove(os.path.join(self.digest_dir, name))

    def verify(self, step: int) -> str | None:
        """None if the step's files match their digest, else what is wrong ("unverified": none)."""
        path = self._digest_path(step)
        if not os.path.exists(path):
            return "unverified"
        try:
            with open(path) as f:
                want = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            return f"digest file unreadable ({e})"
        got = file_digests(self.step_path(step))
        missing = sorted(set(want) - set(got))
        if missing:
            return f"file {missing[0]} is missing"
        changed = sorted(k for k in want if want[k] != got.get(k))
        if changed:
            return f"file {changed[0]} does not match its digest"
        return None

    def _set_aside(self, step: int, why: str) -> None:
        dest = os.path.join(self.directory + ".damaged", f"{step}-{int(time.time())}")
        logging.warning(
            "checkpoint %s is damaged (%s); moved to %s", self.step_path(step), why, dest
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(self.step_path(step), dest)
            if os.path.exists(self._digest_path(step)):
                os.remove(self._digest_path(step))
        self.manager.reload()

    def restore_latest(
        self, abstract_state: TrainState, shardings: TrainState
    ) -> tuple[int, TrainState | None, dict[str, Any]]:
        """(step, state, meta) of the newest valid checkpoint; (0, None, {}) when there is none.

        Damaged steps are set aside (module docstring); InputError if every step is damaged.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            problem = self.verify(step)
            if problem == "unverified":
                logging.warning(
                    "checkpoint %s has no digest; restoring it unverified", self.step_path(step)
                )
            elif problem is not None:
                self._set_aside(step, problem)
                continue
            try:
                state, meta = self.restore(step, abstract_state, shardings)  # checks shapes first
            except InputError:  # a model mismatch is an error, not damage
                raise
            except Exception as e:  # orbax: truncated, unreadable or inconsistent files
                self._set_aside(step, f"restore failed: {type(e).__name__}: {e}"[:300])
                continue
            return step, state, meta
        if steps:
            raise InputError(
                f"none of the {len(steps)} checkpoints is valid (damaged ones were moved to "
                f"{self.directory}.damaged); delete the directory to train from the start",
                path=self.directory,
            )
        return 0, None, {}

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int, *, final: bool = False) -> bool:
        return final or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Save (asynchronously) unless a checkpoint of this step already exists."""
        if step in self.manager.all_steps():
            return
        # Orbax waits for the previous save before starting this one anyway: wait here, so the
        # previous step is committed, and digest it.
        self.manager.wait_until_finished()
        self.record_digests()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))
            ),
            force=True,
        )

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check_shapes(self, step: int, abstract_state: TrainState) -> None:
        """InputError when a stored parameter's shape differs from the model config's."""
        metadata = self.manager.item_metadata(step)
        stored = metadata["state"] if metadata is not None else None
        stored_params = _get(stored, "params")
        if stored_params is None:
            raise InputError("checkpoint has no parameters", path=self.step_path(step))
        want = {
            jax.tree_util.keystr(path, simple=True, separator="."): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
        }
        got = {
            jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                stored_params, is_leaf=lambda x: hasattr(x, "shape")
            )[0]
        }
        for name, shape in want.items():
            if name not in got:
                raise InputError(
                    "parameter missing from the checkpoint", path=self.step_path(step), field=name
                )
            if tuple(got[name]) != tuple(shape):
                raise InputError(
                    f"checkpoint parameter shape {tuple(got[name])} does not match the model "
                    f"config's {tuple(shape)}",
                    path=self.step_path(step),
                    field=name,
                )
        extra = sorted(set(got) - set(want))
        if extra:
            raise InputError(
                "checkpoint parameter not in the model config",
                path=self.step_path(step),
                field=extra[0],
            )

    def restore(
        self, step: int, abstract_state: TrainState, shardings: TrainState
    ) -> tuple[TrainState, dict[str, Any]]:
        """The TrainState (placed on `shardings`) and meta dict saved at `step`."""
        self.check_shapes(step, abstract_state)
        target = _abstract_with_shardings(abstract_state, shardings)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"] or {})

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed (and digest them)."""
        self.manager.wait_until_finished()
        self.record_digests()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.record_digests()
        self.manager.close()


def file_digests(root: str) -> dict[str, str]:
    """{relative path: SHA-256} of every file under `root`."""
    return {
        os.path.relpath(os.path.join(d, n), root): file_sha256(os.path.join(d, n))
        for d, _, names in os.walk(root)
        for n in names
    }


def _remove_unfinished_saves(directory: str) -> None:
    """Delete the temporary directories of saves a killed process never finished.

    Done here, synchronously, rather than with orbax's `cleanup_tmp_directories`, whose background
    deletion can race with a new save of the same step (it reuses the same temporary name).
    """
    if jax.process_index() == 0 and os.path.isdir(directory):
        for name in os.listdir(directory):
            if TMP_MARKER in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ideal_jax.checkpoint.cleanup")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    # Named up front so that a fresh manager (a resumed process) can read metadata and restore.
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def _get(tree: Any, key: str) -> Any:
    """Orbax metadata trees are dicts or objects depending on the version: read either."""
    if tree is None:
        return None
    if isinstance(tree, dict) or hasattr(tree, "keys"):
        return tree.get(key) if hasattr(tree, "get") else tree[key]
    return getattr(tree, key, None)


def restore_params_only(directory: str, step: int | None = None) -> Any:
    """Parameters from a checkpoint as host numpy arrays (no model config or mesh needed)."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_handlers())
    step = manager.latest_step() if step is None else step
    if step is None:
        raise InputError("no checkpoint found", path=directory)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return jax.tree.map(np.asarray, _get(restored["state"], "params"))
