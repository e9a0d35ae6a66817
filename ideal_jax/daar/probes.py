"""DaaR's probes (METHOD.md §2.3-2.4): a domain classifier ψ_dom and a diversity regressor ψ_div.

Both read f(x), the padding-masked token-mean of the frozen base model's hidden state after the
first `feature_layer` decoder layers (`ideal_jax.daar.centroids.embed_*` with source="hidden"),
through an MLP d -> 2d -> d -> d/2 -> 256 -> out with ReLU:
  ψ_dom: out = K, cross-entropy on the k-means pseudo-labels;
  ψ_div: out = 1, MSE on H(x), the entropy of softmax(ψ_dom(f(x))).

A probe is a pure dict {"mean": [D], "std": [D], "mlp": [{"w", "b"}, ...], "out_shift": [],
"out_scale": []}. Features are standardized with the training split's statistics first: raw hidden
states of an LM have a tiny overall scale (random init) or a few huge-magnitude dimensions (trained
models), either of which stalls Adam at the small learning rates the paper used. ψ_div's target is
standardized too (prediction = mlp * out_scale + out_shift): entropies of a confident ψ_dom are
~0.01 nats, far below the O(1) output of a freshly initialized MLP, which MSE then spends its
whole budget shrinking.

Training (`train_probe`): Adam, the public code's batch 1 / lr 1e-5 / 1 epoch / 97-3 split as
keyword defaults (the pipeline passes cfg.daar.probe_*), with decoupled weight decay and early
stopping on the validation loss as options. An epoch runs as a few jitted `lax.scan` calls of up to
MAX_CHUNK steps each (batch 1 would otherwise pay one dispatch per example); batches are sharded
over the mesh's batch axes, partial batches padded with weight-0 rows and the last chunk with
weight-0 steps, so every call has the same shape.

Cross-fitting (`cross_fit_logits`): ψ_div must predict how uncertain ψ_dom is on examples it has
not seen (the pool), so its targets are held-out: K folds, ψ_dom trained on K-1 predicts the K-th.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ideal_jax import sharding

Probe = dict[str, Any]
KINDS = ("classify", "regress")


def paper_hidden(d: int) -> list[int]:
    """The hidden widths of the paper's probe MLP for feature dimension d: 2d, d, d/2, 256."""
    return [2 * d, d, max(d // 2, 1), 256]


def init_probe(seed: int, d: int, out: int, hidden: Sequence[int] | None = None) -> Probe:
    """He-initialized MLP (ReLU) with zero biases; identity standardization until fitted.

    Drawn with numpy: eager jax initializers would compile one tiny program per layer shape.
    """
    dims = [d, *(paper_hidden(d) if not hidden else hidden), out]
    rng = np.random.default_rng(seed)
    layers = [
        {
            "w": (rng.standard_normal((d_in, d_out)) * np.sqrt(2.0 / d_in)).astype(np.float32),
            "b": np.zeros((d_out,), np.float32),
        }
        for d_in, d_out in zip(dims[:-1], dims[1:])
    ]
    return {
        "mean": np.zeros((d,), np.float32),
        "std": np.ones((d,), np.float32),
        "mlp": layers,
        "out_shift": np.float32(0.0),
        "out_scale": np.float32(1.0),
    }


def apply_mlp(mlp: list[dict[str, jax.Array]], x_nd: jax.Array) -> jax.Array:
    """[N, out] outputs of the MLP on already-standardized features."""
    for i, layer in enumerate(mlp):
        x_nd = x_nd @ layer["w"] + layer["b"]
        if i < len(mlp) - 1:
            x_nd = jax.nn.relu(x_nd)
    return x_nd


@jax.jit
def apply_probe(probe: Probe, features_nd: jax.Array) -> jax.Array:
    """[N, out] outputs (logits for ψ_dom, [N, 1] predicted entropy for ψ_div)."""
    out_no = apply_mlp(probe["mlp"], (features_nd - probe["mean"]) / probe["std"])
    return out_no * probe["out_scale"] + probe["out_shift"]


def log_softmax(logits_nc: np.ndarray) -> np.ndarray:
    z_nc = np.asarray(logits_nc, np.float64)
    z_nc = z_nc - z_nc.max(axis=-1, keepdims=True)
    return z_nc - np.log(np.exp(z_nc).sum(axis=-1, keepdims=True))


def entropy(logits_nc: np.ndarray) -> np.ndarray:
    """[N] entropy (nats) of softmax(logits): DaaR's diversity reward H(x)."""
    logp_nc = log_softmax(logits_nc)
    return (-np.sum(np.exp(logp_nc) * logp_nc, axis=-1)).astype(np.float32)


def predict(probe: Probe, features_nd: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """[N, out] probe outputs, computed in fixed-size chunks (one compilation per probe shape)."""
    features_nd = np.asarray(features_nd, np.float32)
    n, d = features_nd.shape
    outs = []
    for start in range(0, n, batch_size):
        chunk = features_nd[start : start + batch_size]
        padded = np.zeros((batch_size, d), np.float32)
        padded[: len(chunk)] = chunk
        outs.append(np.asarray(apply_probe(probe, padded))[: len(chunk)])
    out_dim = probe["mlp"][-1]["b"].shape[0]
    return np.concatenate(outs) if outs else np.zeros((0, out_dim), np.float32)


@dataclasses.dataclass(frozen=True)
class ProbeStats:
    kind: str
    n_train: int
    n_val: int
    steps: int
    epochs_run: int  # < epochs when early stopping stopped the run
    best_epoch: int  # the epoch whose parameters were kept (1-based; the last without stopping)
    final_train_loss: float  # mean training loss over the last epoch run
    val_loss: float
    val_accuracy: float | None  # classify only
    val_correlation: float | None  # regress only: Pearson r between prediction and target

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _loss(mlp, x_bd, y_b1, w_b1, kind: str) -> jax.Array:
    out_bo = apply_mlp(mlp, x_bd)
    if kind == "classify":
        per_row_b = optax.softmax_cross_entropy_with_integer_labels(out_bo, y_b1[:, 0])
    else:
        per_row_b = jnp.square(out_bo[:, 0] - y_b1[:, 0])
    w_b = w_b1[:, 0]
    return jnp.sum(per_row_b * w_b) / jnp.maximum(jnp.sum(w_b), 1.0)


# Adam without its learning rate: the rate (and the decoupled weight decay) are traced arguments,
# so one compiled program serves every setting (and both probes of a kind share it).
_ADAM = optax.scale_by_adam()
# Steps per compiled scan: an epoch runs as ceil(steps / chunk) calls of one program; the last
# call is padded with weight-0 steps, which leave the parameters and the Adam state unchanged.
MAX_CHUNK = 256


@functools.partial(jax.jit, static_argnames=("kind",))
def _train_chunk(mlp, opt_state, x_sbd, y_sb1, w_sb1, lr, weight_decay, *, kind: str):
    """S Adam(W) steps in one `lax.scan`; returns (mlp, opt_state, per-step loss [S])."""

    def step(carry, batch):
        mlp, opt_state = carry
        x_bd, y_b1, w_b1 = batch
        loss, grads = jax.value_and_grad(_loss)(mlp, x_bd, y_b1, w_b1, kind)
        updates, new_opt_state = _ADAM.update(grads, opt_state, mlp)
        # Decoupled weight decay (AdamW): p <- p - lr * (adam_update + weight_decay * p).
        updates = jax.tree.map(lambda u, p: -lr * (u + weight_decay * p), updates, mlp)
        new_mlp = optax.apply_updates(mlp, updates)
        live = jnp.sum(w_b1) > 0  # a padding step changes nothing (not even Adam's step count)
        keep = lambda new, old: jnp.where(live, new, old)
        carry = (jax.tree.map(keep, new_mlp, mlp), jax.tree.map(keep, new_opt_state, opt_state))
        return carry, loss

    (mlp, opt_state), loss_s = jax.lax.scan(step, (mlp, opt_state), (x_sbd, y_sb1, w_sb1))
    return mlp, opt_state, loss_s


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index split; val is empty when val_fraction == 0."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n > 1 else 0), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _place(array: np.ndarray, mesh: Mesh | None) -> Any:
    """[S, B, ...] steps of batches: the rows (axis 1) sharded over the mesh's batch axes."""
    if mesh is None:
        return array
    spec = PartitionSpec(None, ("data", "fsdp"), *([None] * (array.ndim - 2)))
    return jax.make_array_from_callback(
        array.shape, NamedSharding(mesh, spec), lambda index: array[index]
    )


def train_probe(
    features_nd: np.ndarray,
    targets_n: np.ndarray,
    *,
    kind: str,
    out: int,
    hidden: Sequence[int] | None = None,
    lr: float = 1e-5,
    epochs: int = 1,
    batch_size: int = 1,
    val_fraction: float = 0.03,
    weight_decay: float = 0.0,
    patience: int = 0,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> tuple[Probe, ProbeStats]:
    """Fits a probe with Adam; `targets_n` are int labels (classify) or float targets (regress).

    The keyword defaults are the public code's (batch 1, Adam 1e-5, 1 epoch, 97/3 split); the
    pipeline passes cfg.daar.probe_*. weight_decay > 0: decoupled decay (AdamW). patience > 0:
    early stopping: the validation loss is measured after every epoch, training stops after
    `patience` epochs without a new best, and the best epoch's parameters are returned.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    features_nd = np.asarray(features_nd, np.float32)
    n, d = features_nd.shape
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    if patience > 0 and len(val_idx) == 0:
        raise ValueError(
            "early stopping (patience > 0) needs a validation split (val_fraction > 0)"
        )
    x_train = features_nd[train_idx]
    mean_d = x_train.mean(axis=0)
    std_d = np.maximum(x_train.std(axis=0), 1e-6)
    probe = init_probe(seed, d, out, hidden)
    probe["mean"], probe["std"] = mean_d.astype(np.float32), std_d.astype(np.float32)
    y_dtype = np.int32 if kind == "classify" else np.float32
    x_std = (features_nd - mean_d) / std_d
    y_n = np.asarray(targets_n).astype(y_dtype)
    y_fit_n = y_n
    if kind == "regress":
        shift = float(y_n[train_idx].mean())
        scale = float(max(y_n[train_idx].std(), 1e-6))
        probe["out_shift"], probe["out_scale"] = np.float32(shift), np.float32(scale)
        y_fit_n = ((y_n - shift) / scale).astype(np.float32)

    divisor = sharding.batch_divisor(mesh) if mesh is not None else 1
    rows = -(-max(1, min(batch_size, len(train_idx))) // divisor) * divisor
    steps_per_epoch = -(-len(train_idx) // rows)
    chunk = min(MAX_CHUNK, 1 << max(steps_per_epoch - 1, 0).bit_length())
    mlp = jax.device_put(probe["mlp"], sharding.replicated(mesh) if mesh is not None else None)
    opt_state = _ADAM.init(mlp)
    lr_dev, wd_dev = jnp.float32(lr), jnp.float32(weight_decay)
    rng = np.random.default_rng(seed + 1)
    steps, epoch_loss = 0, float("nan")
    best = (float("inf"), -1, None)  # (val loss, epoch, mlp) for early stopping
    epochs_run = 0
    for epoch in range(epochs):
        order = train_idx[rng.permutation(len(train_idx))]
        losses = []
        for start in range(0, steps_per_epoch, chunk):
            live = min(chunk, steps_per_epoch - start)
            x_sbd = np.zeros((chunk, rows, d), np.float32)
            y_sb1 = np.zeros((chunk, rows, 1), y_dtype)
            w_sb1 = np.zeros((chunk, rows, 1), np.float32)
            for s in range(live):
                idx = order[(start + s) * rows : (start + s + 1) * rows]
                x_sbd[s, : len(idx)] = x_std[idx]
                y_sb1[s, : len(idx), 0] = y_fit_n[idx]
                w_sb1[s, : len(idx)] = 1.0
            mlp, opt_state, loss_s = _train_chunk(
                mlp,
                opt_state,
                _place(x_sbd, mesh),
                _place(y_sb1, mesh),
                _place(w_sb1, mesh),
                lr_dev,
                wd_dev,
                kind=kind,
            )
            losses.append(np.asarray(loss_s)[:live])
            steps += live
        epoch_loss = float(np.mean(np.concatenate(losses)))
        epochs_run = epoch + 1
        if patience > 0:
            probe["mlp"] = jax.tree.map(np.asarray, jax.device_get(mlp))
            val_loss = _evaluate(probe, features_nd[val_idx], y_n[val_idx], kind)["val_loss"]
            if val_loss < best[0]:
                best = (val_loss, epoch, probe["mlp"])
            elif epoch - best[1] >= patience:
                break
    if best[2] is not None:
        probe["mlp"] = best[2]
    else:
        probe["mlp"] = jax.tree.map(np.asarray, jax.device_get(mlp))
    stats = _evaluate(probe, features_nd[val_idx], y_n[val_idx], kind)
    return probe, ProbeStats(
        kind=kind,
        n_train=len(train_idx),
        n_val=len(val_idx),
        steps=steps,
        epochs_run=epochs_run,
        best_epoch=best[1] + 1 if best[2] is not None else epochs_run,
        final_train_loss=epoch_loss,
        **stats,
    )


def cross_fit_logits(
    features_nd: np.ndarray,
    labels_n: np.ndarray,
    *,
    folds: int,
    out: int,
    seed: int = 0,
    **train_kwargs: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """[N, K] held-out ψ_dom logits: example i is predicted by a probe trained without its fold.

    The examples are split into `folds` seeded folds; for each, a classifier is trained on the
    other folds (`train_probe(..., **train_kwargs)`) and predicts the held-out one. The entropy of
    these logits is the honest target for ψ_div: the pool examples ψ_div scores were never seen by
    ψ_dom either, while in-sample entropies of a probe that fits its training set are near 0.
    Also returns {folds, heldout_accuracy, heldout_mean_entropy, fold_accuracy}.
    """
    features_nd = np.asarray(features_nd, np.float32)
    labels_n = np.asarray(labels_n, np.int32)
    n = len(features_nd)
    if not 2 <= folds <= n:
        raise ValueError(f"cross-fitting needs 2 <= folds <= {n} examples, got {folds}")
    fold_n = np.empty(n, np.int32)
    fold_n[np.random.default_rng(seed + 2).permutation(n)] = np.arange(n) % folds
    logits_nk = np.zeros((n, out), np.float32)
    fold_accuracy = []
    for f in range(folds):
        held = np.flatnonzero(fold_n == f)
        fit = np.flatnonzero(fold_n != f)
        probe, _ = train_probe(
            features_nd[fit], labels_n[fit], kind="classify", out=out, seed=seed + f, **train_kwargs
        )
        logits_nk[held] = predict(probe, features_nd[held])
        fold_accuracy.append(float(np.mean(logits_nk[held].argmax(-1) == labels_n[held])))
    return logits_nk, {
        "folds": folds,
        "heldout_accuracy": float(np.mean(logits_nk.argmax(-1) == labels_n)),
        "heldout_mean_entropy": float(np.mean(entropy(logits_nk))),
        "fold_accuracy": fold_accuracy,
    }


def _evaluate(probe: Probe, x_nd: np.ndarray, y_n: np.ndarray, kind: str) -> dict[str, Any]:
    if len(x_nd) == 0:
        return {"val_loss": float("nan"), "val_accuracy": None, "val_correlation": None}
    out_no = predict(probe, x_nd)
    if kind == "classify":
        logp_nc = log_softmax(out_no)
        loss = float(-np.mean(logp_nc[np.arange(len(y_n)), y_n]))
        acc = float(np.mean(out_no.argmax(-1) == y_n))
        return {"val_loss": loss, "val_accuracy": acc, "val_correlation": None}
    pred_n = out_no[:, 0]
    corr = float(np.corrcoef(pred_n, y_n)[0, 1]) if len(y_n) > 1 and np.std(y_n) > 0 else None
    return {
        "val_loss": float(np.mean((pred_n - y_n) ** 2)),
        "val_accuracy": None,
        "val_correlation": corr,
    }


def probe_to_arrays(probe: Probe) -> dict[str, np.ndarray]:
    """Flat {name: array} (for np.savez); inverse of `probe_from_arrays`."""
    flat = {key: np.asarray(probe[key]) for key in ("mean", "std", "out_shift", "out_scale")}
    for i, layer in enumerate(probe["mlp"]):
        flat[f"mlp_{i}_w"] = np.asarray(layer["w"])
        flat[f"mlp_{i}_b"] = np.asarray(layer["b"])
    return flat


def probe_from_arrays(flat: dict[str, np.ndarray]) -> Probe:
    n_layers = sum(1 for key in flat if key.startswith("mlp_") and key.endswith("_w"))
    return {
        **{key: np.asarray(flat[key]) for key in ("mean", "std", "out_shift", "out_scale")},
        "mlp": [
            {"w": np.asarray(flat[f"mlp_{i}_w"]), "b": np.asarray(flat[f"mlp_{i}_b"])}
            for i in range(n_layers)
        ],
    }
