"""Pad or pack tokenized examples into `Batch` dicts (docs/architecture.md), deterministically.

A Batch is a dict of [B, T] numpy arrays:
  tokens int32, targets int32 (next token within the same segment), weights float32 (1.0 exactly
  where the *target* is a response token), segment_ids int32 (0 = padding, 1.. = example within the
  row), positions int32 (restart at 0 per segment), domain_ids int32 (-1 for padding).
An example of length L occupies L slots of a row; its last slot has no target (weight 0), so a
target never crosses a segment boundary.

Determinism across hosts: every host computes the same global plan from (seed, epoch) and keeps only
its contiguous share of each global batch's rows, so the union over hosts is the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from ideal_jax.data.formatting import TokenizedExample

Batch = dict[str, np.ndarray]
MODES = ("pad", "pack")


def domain_index(
    tokenized: Sequence[TokenizedExample], domain_names: Sequence[str] | None = None
) -> dict[str, int]:
    """Domain name -> id used in `domain_ids` (sorted names unless an order is given)."""
    names = sorted({t.domain for t in tokenized}) if domain_names is None else list(domain_names)
    return {name: i for i, name in enumerate(names)}


def plan_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int, mode: str) -> list[np.ndarray]:
    """Example indices of each row, taking examples in `order`.

    "pad": one example per row. "pack": greedy, a row is closed when the next example does not fit
    (examples are never split, so no response is cut at a row boundary).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if len(lengths) and int(lengths.max()) > seq_len:
        raise ValueError(
            f"an example has {int(lengths.max())} tokens > seq_len={seq_len}: "
            "set max_len <= seq_len"
        )
    if mode == "pad":
        return [order[i : i + 1] for i in range(len(order))]
    rows: list[np.ndarray] = []
    start, used = 0, 0
    ordered_lengths = lengths[order].tolist()  # python ints: the loop is per example, not token
    for k, length in enumerate(ordered_lengths):
        if used + length > seq_len:
            rows.append(order[start:k])
            start, used = k, 0
        used += length
    if start < len(order):
        rows.append(order[start:])
    return rows


def fill_rows(
    tokenized: Sequence[TokenizedExample],
    rows: Sequence[np.ndarray],
    seq_len: int,
    domain_ids_of: dict[str, int],
    *,
    n_rows: int | None = None,
    pad_id: int = 0,
) -> Batch:
    """Builds a Batch from planned rows; rows past `len(rows)` (up to `n_rows`) are all padding."""
    n_rows = len(rows) if n_rows is None else n_rows
    shape = (n_rows, seq_len)
    batch = {
        "tokens": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "weights": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "domain_ids": np.full(shape, -1, np.int32),
    }
    if not rows or sum(len(r) for r in rows) == 0:
        return batch
    # Flatten the plan: for every placed example, its row, its segment number and its row offset.
    ex_idx = np.concatenate(rows)
    row_of = np.repeat(np.arange(len(rows)), [len(r) for r in rows])
    lengths = np.array([len(tokenized[i].input_ids) for i in ex_idx], dtype=np.int64)
    first_in_row = np.r_[True, row_of[1:] != row_of[:-1]]
    ends = np.cumsum(lengths)
    starts = ends - lengths
    row_start = np.maximum.accumulate(np.where(first_in_row, starts, 0))
    offset = starts - row_start  # offset of each example within its row
    seg_start = np.maximum.accumulate(np.where(first_in_row, np.arange(len(ex_idx)), 0))
    segment = np.arange(len(ex_idx)) - seg_start + 1  # 1.. within each row

    # Token-level arrays, one C-level concatenation instead of a per-token loop.
    ids = np.concatenate([tokenized[i].input_ids for i in ex_idx]).astype(np.int32)
    mask = np.concatenate([tokenized[i].loss_mask for i in ex_idx])
    within = np.arange(ids.size) - np.repeat(starts, lengths)  # position inside the example
    flat = np.repeat(row_of * seq_len + offset, lengths) + within
    last = within == np.repeat(lengths - 1, lengths)  # last token of each example: no target

    next_ids = np.r_[ids[1:], pad_id].astype(np.int32)
    next_mask = np.r_[mask[1:], False]
    domains = np.array([domain_ids_of[tokenized[i].domain] for i in ex_idx], np.int32)
    batch["tokens"].flat[flat] = ids
    batch["targets"].flat[flat] = np.where(last, pad_id, next_ids)
    batch["weights"].flat[flat] = np.where(last, False, next_mask).astype(np.float32)
    batch["segment_ids"].flat[flat] = np.repeat(segment, lengths)
    batch["positions"].flat[flat] = within
    batch["domain_ids"].flat[flat] = np.repeat(domains, lengths)
    return batch


def _epoch_plan(
    tokenized: Sequence[TokenizedExample], seq_len: int, mode: str, seed: int, epoch: int
) -> list[np.ndarray]:
    lengths = np.array([len(t.input_ids) for t in tokenized], dtype=np.int64)
    # One generator per (seed, epoch): any host, any restart, the same permutation.
    order = np.random.default_rng([seed, epoch]).permutation(len(tokenized))
    return plan_rows(lengths, order, seq_len, mode)


def steps_per_epoch(
    tokenized: Sequence[TokenizedExample],
    batch_size: int,
    seq_len: int,
    mode: str,
    seed: int = 0,
    epoch: int = 0,
    *,
    drop_remainder: bool = False,
) -> int:
    """Global steps in one epoch ("pack": the row count depends on the epoch's shuffle)."""
    n_rows = len(_epoch_plan(tokenized, seq_len, mode, seed, epoch))
    return n_rows // batch_size if drop_remainder else -(-n_rows // batch_size)


def iterate_batches(
    tokenized: Sequence[TokenizedExample],
    batch_size: int,
    seq_len: int,
    mode: str,
    seed: int,
    epoch: int,
    host_index: int = 0,
    host_count: int = 1,
    *,
    domain_names: Sequence[str] | None = None,
    pad_id: int = 0,
    drop_remainder: bool = False,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Yields this host's [batch_size / host_count, seq_len] share of each global batch of an epoch.

    The last global batch is completed with all-padding rows (weight 0) unless `drop_remainder`.
    `start_step` skips already-trained steps when resuming mid-epoch.
    """
    if batch_size % host_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by host_count={host_count}")
    if not 0 <= host_index < host_count:
        raise ValueError(f"host_index={host_index} outside [0, {host_count})")
    ids_of = domain_index(tokenized, domain_names)
    unknown = sorted({t.domain for t in tokenized} - set(ids_of))
    if unknown:
        raise ValueError(f"examples of domains {unknown} not in domain_names={list(ids_of)}")
    rows = _epoch_plan(tokenized, seq_len, mode, seed, epoch)
    n_steps = len(rows) // batch_size if drop_remainder else -(-len(rows) // batch_size)
    per_host = batch_size // host_count
    for step in range(start_step, n_steps):
        first = step * batch_size + host_index * per_host
        mine = rows[first : first + per_host]
        yield fill_rows(tokenized, mine, seq_len, ids_of, n_rows=per_host, pad_id=pad_id)


# Optional batch fields [B, K]: the positions (along T) of the rows that carry loss weight, and
# which of the K slots are real (1) or filler (0). With them the loss, its softmax and the Fisher's
# sampled targets are formed at those K positions only, not at all T (prompt and padding rows have
# weight 0 and contribute nothing). The layers still see all T rows.
# (Training: train/step.py; the curvature passes: curvature/problem.py.)
LOSS_POSITIONS = "loss_positions"
LOSS_VALID = "loss_valid"


def at_loss_positions(x, batch: dict):
    """x [B, T, ...] → [B, K, ...] at batch[LOSS_POSITIONS] (x itself without that field)."""
    if LOSS_POSITIONS not in batch:
        return x
    idx_bk = batch[LOSS_POSITIONS]
    idx = idx_bk.reshape(idx_bk.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def add_loss_positions(batch: dict, k: int | None = None, minimum: int = 8) -> dict:
    """Host-side: `batch` (numpy, [B, T] fields) with LOSS_POSITIONS / LOSS_VALID [B, K] added.

    K: `k`, else the largest number of weighted tokens in a row rounded up to a power of two (at
    least `minimum`; few shapes, few compilations). Filler slots point at position 0, valid 0.
    """
    weighted_bt = np.asarray(batch["weights"]) > 0
    counts_b = weighted_bt.sum(axis=1)
    most = int(counts_b.max()) if counts_b.size else 0
    if k is None:
        k = max(minimum, 1 << (max(most, 1) - 1).bit_length())
    if most > k:
        raise ValueError(f"a row has {most} weighted tokens, more than k={k}")
    b = weighted_bt.shape[0]
    positions_bk = np.zeros((b, k), np.int32)
    valid_bk = np.zeros((b, k), np.float32)
    rows_n, cols_n = np.nonzero(weighted_bt)  # row-major: each row's positions in order
    slot_n = np.arange(rows_n.size) - np.repeat(np.cumsum(counts_b) - counts_b, counts_b)
    positions_bk[rows_n, slot_n] = cols_n
    valid_bk[rows_n, slot_n] = 1.0
    return {**batch, LOSS_POSITIONS: positions_bk, LOSS_VALID: valid_bk}


def loss_rows_bound(examples: Sequence[TokenizedExample], seq_len: int, minimum: int = 8) -> int:
    """A K for add_loss_positions that no row of `seq_len` tokens built from `examples` exceeds,
    however they are packed: a row's weighted tokens are at most seq_len × the largest weighted
    fraction of one example (its examples' lengths sum to at most seq_len), rounded up to a multiple
    of 8 (at least `minimum`, at most seq_len). One K per training: the step compiles once."""
    frac = max(
        (float(np.sum(ex.loss_mask)) / max(len(ex.input_ids), 1) for ex in examples),
        default=1.0,
    )
    k = int(np.ceil(frac * seq_len - 1e-9))
    return int(min(seq_len, max(minimum, -(-k // 8) * 8)))
