"""Orbax checkpoints of the TrainState plus the data-iterator position.

Layout: `<directory>/<step>/{state,meta}`; `state` is the TrainState pytree (sharded arrays, every
host writes its own shards), `meta` a small JSON dict (epoch, step in epoch, steps per epoch, ...).
Saves are atomic (orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest) and asynchronous by default (the
device-to-host copy happens before `save` returns, so the caller may donate the state right after).

Restoring goes onto the shardings of an abstract target, after checking every parameter's stored
shape against the model config: a mismatch is an InputError naming the checkpoint and parameter.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ideal_jax.train.state import TrainState
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
        """Block until pending asynchronous saves are committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


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
