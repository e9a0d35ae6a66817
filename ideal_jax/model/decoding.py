"""Incremental decoding with a KV cache: greedy or temperature / top-p sampling, batched.

Prompts are left-padded into a [B, P] buffer (segment id 0 on padding), so every row's next token is
written at the same cache index. The whole generation is one `lax.while_loop` inside one jit per
(batch, prompt, new-token) shape bucket; shapes are rounded up to buckets so a stream of requests
with varied lengths compiles only a handful of times.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import Params, forward


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> list[dict]:
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    return [
        {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "segment": jnp.zeros((batch, length), jnp.int32),
            "index": jnp.int32(0),
        }
        for _ in range(cfg.num_layers)
    ]


def _nucleus_threshold(logits_bv: jax.Array, top_p: float, iterations: int = 32) -> jax.Array:
    """[B, 1] the largest logit t with P(logit >= t) >= top_p, by bisection.

    The smallest set of tokens whose probability reaches top_p is {v : logit_v >= t}. Bisection
    costs O(B·V) per iteration; a full sort of the vocabulary is ~100x slower on CPU.
    """
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    lo_b1 = jnp.min(logits_bv, axis=-1, keepdims=True)  # mass(>= lo) = 1 >= top_p
    hi_b1 = jnp.max(logits_bv, axis=-1, keepdims=True) + 1.0  # mass(>= hi) = 0 < top_p

    def step(_, bounds):
        lo_b1, hi_b1 = bounds
        mid_b1 = 0.5 * (lo_b1 + hi_b1)
        mass_b1 = jnp.sum(jnp.where(logits_bv >= mid_b1, probs_bv, 0.0), axis=-1, keepdims=True)
        enough_b1 = mass_b1 >= top_p
        return jnp.where(enough_b1, mid_b1, lo_b1), jnp.where(enough_b1, hi_b1, mid_b1)

    lo_b1, _ = jax.lax.fori_loop(0, iterations, step, (lo_b1, hi_b1))
    return lo_b1


def _sample(logits_bv, rng, temperature: float, top_p: float):
    if temperature <= 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        threshold_b1 = _nucleus_threshold(logits_bv, top_p)
        logits_bv = jnp.where(logits_bv < threshold_b1, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p"))
def generate_tokens(
    cfg: ModelConfig,
    params: Params,
    prompt_bp: jax.Array,
    prompt_mask_bp: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int = -1,
    pad_id: int = 0,
) -> jax.Array:
    """[B, max_new_tokens] new tokens for left-padded prompts; after EOS a row emits `pad_id`."""
    b, p = prompt_bp.shape
    segment_bp = prompt_mask_bp.astype(jnp.int32)
    positions_bp = jnp.maximum(jnp.cumsum(segment_bp, axis=1) - 1, 0)
    cache = init_cache(cfg, b, p + max_new_tokens, cfg.compute_dtype)
    logits_bpv, cache = forward(cfg, params, prompt_bp, positions_bp, segment_bp, cache=cache)
    next_pos_b = positions_bp[:, -1] + 1
    rng, step_rng = jax.random.split(rng)
    token_b = _sample(logits_bpv[:, -1], step_rng, temperature, top_p)
    out_bn = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_b)
    done_b = token_b == eos_id

    def cond(carry):
        i, _, _, _, _, done_b, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        i, token_b, pos_b, cache, out_bn, done_b, rng = carry
        logits_b1v, cache = forward(
            cfg, params, token_b[:, None], pos_b[:, None], jnp.ones((b, 1), jnp.int32), cache=cache
        )
        rng, step_rng = jax.random.split(rng)
        new_b = _sample(logits_b1v[:, 0], step_rng, temperature, top_p)
        new_b = jnp.where(done_b, pad_id, new_b)
        out_bn = out_bn.at[:, i].set(new_b)
        return i + 1, new_b, pos_b + 1, cache, out_bn, done_b | (new_b == eos_id), rng

    carry = (jnp.int32(1), token_b, next_pos_b, cache, out_bn, done_b, rng)
    return jax.lax.while_loop(cond, body, carry)[4]


def bucket(n: int, minimum: int = 8) -> int:
    """Round up to a power of two (at least `minimum`): few shapes, few compilations."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def left_pad(
    sequences: Sequence[Sequence[int]], length: int, pad_id: int, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    rows = rows or len(sequences)
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for i, seq in enumerate(sequences):
        seq = list(seq)[-length:]
        if seq:
            tokens[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = True
    return tokens, mask


def generate(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    max_prompt_len: int | None = None,
) -> list[list[int]]:
    """Token lists in, generated token lists out (EOS and what follows stripped)."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    p_len = bucket(longest) if max_prompt_len is None else min(bucket(longest), max_prompt_len)
    tokens, mask = left_pad(prompts, p_len, pad_id, rows=bucket(len(prompts), 1))
    rng = jax.random.key(0) if rng is None else rng
    out = generate_tokens(
        cfg,
        params,
        tokens,
        mask,
        rng,
        max_new_tokens=bucket(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        eos_id=-1 if eos_id is None else int(eos_id),
        pad_id=pad_id,
    )
    out = np.asarray(out)[: len(prompts), :max_new_tokens]
    results = []
    for row in out.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results
