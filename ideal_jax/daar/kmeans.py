"""K-means (Lloyd) in JAX for DaaR's pseudo-labels (METHOD.md §2.2).

The probe set's centroid embeddings are clustered into K clusters *initialized at the K domain
centroids*, so cluster k inherits domain k's name; the cluster index is the pseudo-label.

Why JAX rather than scikit-learn: it adds no dependency, the whole loop is one jitted
`lax.while_loop` (no host round trip per iteration), and the rows can live sharded over the mesh's
batch axes (the assignment is row-local, the centre update a sum XLA reduces across devices), so
a probe set embedded on the mesh is clustered where it already is. Deterministic: the
initialization is given, ties in the assignment go to the lowest cluster index, and an empty
cluster keeps its previous centre instead of being re-seeded at random.

metric "cosine" is spherical k-means (unit-normalized rows and centres, assignment by dot product),
the geometry DaaR's similarity threshold uses; "euclidean" is classic k-means.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ideal_jax import sharding
from ideal_jax.utils.errors import InputError

METRICS = ("cosine", "euclidean")


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    labels_n: np.ndarray  # int32 [N] cluster index per row
    centers_kd: np.ndarray  # float32 [K, D]
    iterations: int
    converged: bool  # no assignment changed in the last iteration
    inertia: float  # sum of (1 - cos) or of squared distances to the assigned centre


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _assign(x_nd: jax.Array, centers_kd: jax.Array, metric: str) -> tuple[jax.Array, jax.Array]:
    """(labels [N], per-row cost [N]); argmax/argmin return the first index on ties."""
    if metric == "cosine":
        sim_nk = x_nd @ centers_kd.T
        return jnp.argmax(sim_nk, axis=-1).astype(jnp.int32), 1.0 - jnp.max(sim_nk, axis=-1)
    dist_nk = (
        jnp.sum(x_nd * x_nd, -1, keepdims=True)
        - 2.0 * x_nd @ centers_kd.T
        + jnp.sum(centers_kd * centers_kd, -1)[None]
    )
    return jnp.argmin(dist_nk, axis=-1).astype(jnp.int32), jnp.maximum(jnp.min(dist_nk, -1), 0.0)


@functools.partial(jax.jit, static_argnames=("metric", "max_iters"))
def lloyd(
    x_nd: jax.Array, w_n: jax.Array, init_kd: jax.Array, *, metric: str, max_iters: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Weighted Lloyd iterations; rows with weight 0 (padding) never move a centre.

    Returns (labels [N], centers [K, D], iterations, converged, inertia).
    """
    k = init_kd.shape[0]
    if metric == "cosine":
        x_nd, init_kd = _normalize(x_nd), _normalize(init_kd)

    def update(labels_n, centers_kd):
        onehot_nk = jax.nn.one_hot(labels_n, k, dtype=x_nd.dtype) * w_n[:, None]
        counts_k = jnp.sum(onehot_nk, axis=0)
        sums_kd = onehot_nk.T @ x_nd
        means_kd = sums_kd / jnp.maximum(counts_k, 1e-12)[:, None]
        if metric == "cosine":
            means_kd = _normalize(means_kd)
        return jnp.where(counts_k[:, None] > 0, means_kd, centers_kd)  # empty: keep the old centre

    labels0_n, _ = _assign(x_nd, init_kd, metric)

    def cond(carry):
        i, _, _, changed = carry
        return (i < max_iters) & changed

    def body(carry):
        i, labels_n, centers_kd, _ = carry
        centers_kd = update(labels_n, centers_kd)
        new_labels_n, _ = _assign(x_nd, centers_kd, metric)
        changed = jnp.any((new_labels_n != labels_n) & (w_n > 0))
        return i + 1, new_labels_n, centers_kd, changed

    carry = (jnp.int32(0), labels0_n, init_kd, jnp.bool_(True))
    iters, labels_n, centers_kd, changed = jax.lax.while_loop(cond, body, carry)
    _, cost_n = _assign(x_nd, centers_kd, metric)
    return labels_n, centers_kd, iters, ~changed, jnp.sum(cost_n * w_n)


def check_enough_rows(n: int, k: int) -> None:
    """InputError when the probe set has fewer examples than there are clusters."""
    if n < k:
        raise InputError(
            f"the DaaR probe set has {n} examples but K = {k} domains: k-means needs at least one "
            "example per cluster (METHOD.md suggests ~5k probe examples)",
            field="daar.probe",
        )


def kmeans(
    x_nd: np.ndarray,
    init_kd: np.ndarray,
    *,
    metric: str = "cosine",
    max_iters: int = 100,
    mesh: Mesh | None = None,
) -> KMeansResult:
    """Clusters the rows of `x_nd` into K = len(init_kd) clusters starting from `init_kd`.

    Raises InputError when there are fewer rows than clusters (the probe set is too small).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x_nd = np.asarray(x_nd, np.float32)
    init_kd = np.asarray(init_kd, np.float32)
    n, k = x_nd.shape[0], init_kd.shape[0]
    if x_nd.ndim != 2 or init_kd.ndim != 2 or x_nd.shape[1] != init_kd.shape[1]:
        raise ValueError(f"shape mismatch: x {x_nd.shape}, init {init_kd.shape}")
    check_enough_rows(n, k)
    w_n = np.ones((n,), np.float32)
    if mesh is not None:
        # Pad the rows to a multiple of the batch axes with weight-0 rows, then shard them.
        divisor = sharding.batch_divisor(mesh)
        pad = -n % divisor
        x_nd = np.concatenate([x_nd, np.zeros((pad, x_nd.shape[1]), np.float32)])
        w_n = np.concatenate([w_n, np.zeros((pad,), np.float32)])
        x_dev = jax.device_put(x_nd, sharding.batch_sharding(mesh))
        w_dev = jax.device_put(w_n, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        init_dev = jax.device_put(init_kd, sharding.replicated(mesh))
    else:
        x_dev, w_dev, init_dev = x_nd, w_n, init_kd
    labels_n, centers_kd, iters, converged, inertia = lloyd(
        x_dev, w_dev, init_dev, metric=metric, max_iters=int(max_iters)
    )
    return KMeansResult(
        labels_n=np.asarray(labels_n)[:n].astype(np.int32),
        centers_kd=np.asarray(centers_kd, np.float32),
        iterations=int(iters),
        converged=bool(converged),
        inertia=float(inertia),
    )
