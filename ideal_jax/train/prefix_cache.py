"""The frozen prefix of `freeze` fine-tuning, computed once per example and reused.

With train.finetuning = freeze, the decoder layers below the first trained one never change, so
the hidden state entering it depends only on the example: `PrefixCache.hidden(batch)` returns it
for every token of a packed [B, T] batch, [B, T, D] float32, computing only examples it has not
seen. Each example is computed alone, at offset 0 of a row of its length bucket (the smallest power
of two >= its length, at least 16, at most `seq_len`: its canonical layout), so its entry does not
depend on how an epoch packed it: a resumed run, a later epoch, a later round and another method of
a comparison all read the same values (resume is exact), and a short example does not pay for a
row of seq_len tokens.

Entries are keyed by the example's tokens and positions, inside a namespace keyed by the frozen
prefix's parameters (embedding and layers below the boundary, SHA-256 of their bytes), the model
config, the boundary layer and seq_len: a cache is never read for other parameters. With a
`directory`, every entry is written there (one .npy per example, atomically) as it is computed, so
every later training that uses the same directory — the run's other rounds, compare methods and
seeds (train/stage.py puts it at the run's root) — reads it instead of recomputing; up to
`memory_bytes` of entries also stay in memory. Padding positions get zeros (they carry no loss and
real tokens never attend to them).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax import sharding
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import forward
from ideal_jax.utils.atomic import atomic_file


def prefix_fingerprint(model_cfg: ModelConfig, params: Any, start_layer: int, seq_len: int) -> str:
    """SHA-256 over what the prefix's output depends on: the embedding and decoder layers below
    `start_layer` (bytes, in path order), the model config, the boundary and the row length."""
    digest = hashlib.sha256(repr((model_cfg, start_layer, seq_len)).encode())
    frozen = {"embed_tokens": params["embed_tokens"]}
    frozen["layers"] = {k: v for k, v in params["layers"].items() if int(k) < start_layer}
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        # Key names as text: a restored checkpoint's '3' and a live tree's 3 are the same layer.
        names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        digest.update("/".join(names).encode())
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return digest.hexdigest()


def prefix_params(params: Any, start_layer: int) -> dict:
    """The parameters a model of the first `start_layer` decoder layers has (the final norm and
    head come along for the tree's shape; the prefix stops before them)."""
    out = {k: v for k, v in params.items() if k not in ("layers", "lora")}
    out["layers"] = {k: v for k, v in params["layers"].items() if int(k) < start_layer}
    return out


def segments(batch: dict[str, np.ndarray]):
    """(row, column indices, example key) for every packed example (segment) of a host batch."""
    tokens, positions, segs = batch["tokens"], batch["positions"], batch["segment_ids"]
    for b in range(segs.shape[0]):
        for s in np.unique(segs[b]):
            if s == 0:
                continue
            cols = np.nonzero(segs[b] == s)[0]
            key = hashlib.sha256(
                np.ascontiguousarray(tokens[b, cols], np.int32).tobytes()
                + np.ascontiguousarray(positions[b, cols], np.int32).tobytes()
            ).hexdigest()[:32]
            yield b, cols, key


class PrefixCache:
    """Hidden states entering decoder layer `start_layer`, per example (see the module doc)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        params: Any,
        start_layer: int,
        seq_len: int,
        mesh: Any,
        *,
        rows: int,
        memory_bytes: int,
        directory: str | None = None,
    ):
        if start_layer < 1:
            raise ValueError("a prefix cache needs start_layer >= 1")
        # Its own copy of what the prefix reads (the training step donates the state's buffers),
        # run as a model of `start_layer` layers.
        self.params = jax.tree.map(jnp.copy, prefix_params(params, start_layer))
        self.model_cfg, self.start_layer = model_cfg, start_layer
        prefix_cfg = model_cfg.replace(num_layers=start_layer)
        self.seq_len, self.mesh, self.rows = seq_len, mesh, rows
        self.memory_bytes = int(memory_bytes)
        self.fingerprint = prefix_fingerprint(model_cfg, params, start_layer, seq_len)
        self.directory = (
            None if directory is None else os.path.join(directory, self.fingerprint[:24])
        )
        self._memory: dict[str, np.ndarray] = {}
        self._bytes = 0
        self.computed = 0  # examples computed (not read back), for tests and timings

        def prefix(p, tokens, positions, segment_ids):
            return forward(
                prefix_cfg,
                p,
                tokens,
                positions,
                segment_ids,
                num_layers=start_layer,
                return_hidden=True,
            )

        self._prefix = jax.jit(sharding.traced_in(mesh, prefix))

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.npy")

    def _lookup(self, key: str) -> np.ndarray | None:
        hit = self._memory.get(key)
        if hit is None and self.directory is not None and os.path.exists(self._path(key)):
            hit = np.load(self._path(key))
        return hit

    def _store(self, key: str, hidden_td: np.ndarray) -> None:
        if self.directory is not None and not os.path.exists(self._path(key)):
            os.makedirs(self.directory, exist_ok=True)  # written through: other trainings read it
            with atomic_file(self._path(key), "wb") as f:
                np.save(f, hidden_td)
        if self._bytes + hidden_td.nbytes <= self.memory_bytes:
            self._memory[key] = hidden_td
            self._bytes += hidden_td.nbytes

    def bucket(self, length: int) -> int:
        """The row length an example of `length` tokens is computed in (its canonical layout)."""
        return min(self.seq_len, max(16, 1 << (max(length, 1) - 1).bit_length()))

    def compute(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """Hidden states [len, D] of (tokens, positions) examples, each alone at offset 0 of a
        row of its length bucket (the canonical layout), `rows` rows per call."""
        out: list[np.ndarray | None] = [None] * len(examples)
        by_bucket: dict[int, list[int]] = {}
        for i, (tok, _) in enumerate(examples):
            by_bucket.setdefault(self.bucket(len(tok)), []).append(i)
        for width, members in sorted(by_bucket.items()):
            for i, hidden in zip(
                members, self._compute_rows([examples[i] for i in members], width)
            ):
                out[i] = hidden
        self.computed += len(examples)
        return out

    def _compute_rows(self, examples, width: int) -> list[np.ndarray]:
        out = []
        for start in range(0, len(examples), self.rows):
            chunk = examples[start : start + self.rows]
            shape = (self.rows, width)
            tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            segs = np.zeros(shape, np.int32)
            for r, (tok, pos) in enumerate(chunk):
                tokens[r, : len(tok)], positions[r, : len(tok)], segs[r, : len(tok)] = tok, pos, 1
            batch = sharding.shard_batch(
                {"tokens": tokens, "positions": positions, "segment_ids": segs}, self.mesh
            )
            hidden = np.asarray(
                jax.device_get(
                    self._prefix(
                        self.params, batch["tokens"], batch["positions"], batch["segment_ids"]
                    )
                ),
                np.float32,
            )
            out += [hidden[r, : len(tok)].copy() for r, (tok, _) in enumerate(chunk)]
        return out

    def hidden(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """[B, T, D] float32: every packed example's prefix output at its columns, zeros at
        padding."""
        b, t = batch["tokens"].shape
        out = np.zeros((b, t, self.model_cfg.hidden_size), np.float32)
        missing: dict[str, list[tuple[int, np.ndarray]]] = {}
        examples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for row, cols, key in segments(batch):
            hit = self._lookup(key)
            if hit is not None:
                out[row, cols] = hit
                continue
            missing.setdefault(key, []).append((row, cols))
            examples[key] = (batch["tokens"][row, cols], batch["positions"][row, cols])
        if missing:
            keys = list(missing)
            for key, hidden_td in zip(keys, self.compute([examples[k] for k in keys])):
                self._store(key, hidden_td)
                for row, cols in missing[key]:
                    out[row, cols] = hidden_td
        return out
