"""Per-example influence of training examples on the reference losses, streamed in chunks.

score[n, r] = − ∇ℓ̄_n · H⁻¹ g_ref,r: the first-order change of reference loss r when example n's
weight grows (Lemma 1 with a single example as the "domain", paper scaling), where ℓ̄_n is example
n's token-weighted mean loss. An example is one batch row (use padded, unpacked batches here). The
inverse products v_r = H⁻¹ g_ref,r are computed once; each batch then costs one vmapped backward
pass in chunks of `chunk_size` rows, so memory does not grow with the dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.kfac import Batch, CurvatureProblem, Params, weighted_loss_sum


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, max(at_most, 1)) + 1) if n % d == 0)


def _scores_step(
    problem: CurvatureProblem, chunk_size: int, params: Params, batch: Batch, vs: dict
) -> jax.Array:
    selected, rest = layers_lib.split_params(params, problem.layers)
    b = batch["weights"].shape[0]
    chunk = _largest_divisor(b, chunk_size)

    def one(row):
        row_batch = jax.tree.map(lambda x: x[None], row)
        fn = lambda s: weighted_loss_sum(problem, layers_lib.merge_params(s, rest), row_batch)
        grad, w = jax.grad(fn, has_aux=True)(selected)
        dots_r = sum(
            jnp.sum(g[None] * v, axis=tuple(range(1, v.ndim)))
            for g, v in zip(jax.tree.leaves(grad), jax.tree.leaves(vs))
        )
        return -dots_r / jnp.maximum(w, 1e-30)

    rows = jax.tree.map(lambda x: x.reshape(b // chunk, chunk, *x.shape[1:]), dict(batch))
    out = jax.lax.map(jax.vmap(one), rows)
    return out.reshape(b, -1)


def stack_vectors(vectors: list[dict]) -> dict:
    """[v_1, ..., v_R] → one pytree with a leading [R] axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *vectors)


def iter_scores(
    problem: CurvatureProblem,
    params: Params,
    batches: Iterable[Batch],
    inverse_ref_vectors: list[dict],
    *,
    chunk_size: int = 8,
) -> Iterator[np.ndarray]:
    """Yields scores [B, R] per batch (rows with no response tokens score 0)."""
    vs = stack_vectors(inverse_ref_vectors)
    step = jax.jit(lambda p, b, v: _scores_step(problem, chunk_size, p, b, v))
    for batch in batches:
        yield np.asarray(step(params, batch, vs))


def per_example_scores(
    problem: CurvatureProblem,
    params: Params,
    batches: Iterable[Batch],
    inverse_ref_vectors: list[dict],
    *,
    chunk_size: int = 8,
) -> np.ndarray:
    """All scores [N, R], built chunk-wise on the host."""
    parts = list(iter_scores(problem, params, batches, inverse_ref_vectors, chunk_size=chunk_size))
    if not parts:
        return np.zeros((0, len(inverse_ref_vectors)))
    return np.concatenate(parts, axis=0)
