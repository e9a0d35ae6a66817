"""Per-example influence of training examples on the reference losses, streamed batch by batch.

score[n, r] = − ∇ℓ̄_n · H⁻¹ g_ref,r: the first-order change of reference loss r when example n's
weight grows (Lemma 1 with a single example as the "domain", paper scaling), where ℓ̄_n is example
n's token-weighted mean loss. An example is one batch row (use padded, unpacked batches here). The
inverse products v_r = H⁻¹ g_ref,r are computed once; each batch then costs ONE forward and ONE
backward pass: a dense layer's per-example gradient is X̃_nᵀ Δ_n (curvature/captures.py), formed
one example at a time from the captured inputs and output gradients and dotted with the R vectors
(2TIO + 2IOR FLOPs per example and layer; `example_dots`).

`example_contributions` returns the unnormalised −v_r · Σ_t w_t ∇ℓ_t with the example's token
weight: their sums over a domain are the domain's α times its weight (alpha.standard_errors).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.curvature import captures
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.curvature.problem import Batch, CurvatureProblem, Params
from ideal_jax.utils import progress


def example_dots(x_bti: jax.Array, d_bto: jax.Array, v_rio: jax.Array):
    """(c [B, R] = −⟨X̃_nᵀΔ_n, V_r⟩, Σ_n X̃_nᵀΔ_n [I, O]) for one dense layer's captures.

    One example at a time: its gradient X̃_nᵀΔ_n is one plain I×O matrix product (2TIO) dotted
    with the R vectors as one [R, I·O] × [I·O] product (2IOR) — the cheaper order whenever R ≥ 2
    (Σ_t x̃_tᵀ V_r δ_t per vector costs 2TIOR) — and added to the running batch gradient. Measured
    on XLA:CPU this is at least as fast as batched [chunk, I, O] products
    (benchmarks/bench_score_passes.py), and its only temporary is one I×O matrix.
    """
    _, i, o = v_rio.shape
    v_rk = v_rio.reshape(v_rio.shape[0], i * o)

    def body(g_io, x_d):
        x_ti, d_to = x_d
        g = x_ti.T @ d_to
        return g_io + g, -(v_rk @ g.reshape(i * o))

    g_io, c_br = jax.lax.scan(body, jnp.zeros((i, o), jnp.float32), (x_bti, d_bto))
    return c_br, g_io


def contributions_and_gradient(problem: CurvatureProblem, params: Params, batch: Batch, vs: dict):
    """(c [B, R] = −v_r · Σ_{t∈n} w_t ∇ℓ_t, w [B] = Σ_{t∈n} w_t, Σ_n w_n ∇ℓ̄_n summed gradient)
    from one forward + one backward pass of `batch` (vs: leading [R] axis on every leaf)."""
    selected, rest = layers_lib.split_params(params, problem.layers)
    weights_r = problem_lib.loss_rows(problem, batch)[1]
    cotangent = captures.loss_cotangent(problem, batch, weights_r)
    _, caught = captures.layer_captures(problem, selected, rest, batch, cotangent)
    b = batch["weights"].shape[0]
    c_br = 0.0
    grad = {}
    for path, (x_bti, d_bto) in caught.items():
        v_rio = vs[path]["kernel"]
        if vs[path].get("bias") is not None:  # the bias row, as in layer_array, per r
            v_rio = jnp.concatenate([v_rio, vs[path]["bias"][:, None, :]], axis=1)
        c_layer, g_io = example_dots(x_bti, d_bto, v_rio)
        c_br = c_br + c_layer
        grad[path] = layers_lib.layer_from_array(g_io, selected[path])
    w_b = jnp.sum(batch["weights"].reshape(b, -1).astype(jnp.float32), axis=1)
    return c_br, w_b, grad


def _scores_step(problem: CurvatureProblem, params: Params, batch: Batch, vs: dict) -> jax.Array:
    c_br, w_b, _ = contributions_and_gradient(problem, params, batch, vs)
    return jnp.where(w_b[:, None] > 0, c_br / jnp.maximum(w_b[:, None], 1e-30), 0.0)


@functools.lru_cache(maxsize=32)
def _scores_jit(problem: CurvatureProblem):
    """Jitted once per problem for the process (IDEAL's rounds reuse the compilation)."""
    return jax.jit(functools.partial(_scores_step, problem))


def stack_vectors(vectors: list[dict]) -> dict:
    """[v_1, ..., v_R] → one pytree with a leading [R] axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *vectors)


def iter_scores(
    problem: CurvatureProblem,
    params: Params,
    batches: Iterable[Batch],
    inverse_ref_vectors: list[dict],
) -> Iterator[np.ndarray]:
    """Yields scores [B, R] per batch (rows with no response tokens score 0); one forward and one
    backward pass serve the whole batch."""
    vs = stack_vectors(inverse_ref_vectors)
    step = _scores_jit(problem)
    for batch in progress.bar(batches, "per-example scores"):
        yield np.asarray(step(params, batch, vs))


def per_example_scores(
    problem: CurvatureProblem,
    params: Params,
    batches: Iterable[Batch],
    inverse_ref_vectors: list[dict],
) -> np.ndarray:
    """All scores [N, R], built batch-wise on the host."""
    parts = list(iter_scores(problem, params, batches, inverse_ref_vectors))
    if not parts:
        return np.zeros((0, len(inverse_ref_vectors)))
    return np.concatenate(parts, axis=0)
