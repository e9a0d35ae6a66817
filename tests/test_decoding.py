"""KV-cache decoding equals step-by-step full forward passes."""

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.model import decoding
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import forward, init_params

CFG = ModelConfig(vocab_size=61, num_layers=2)


def _params():
    # Scaled-up random weights give confident, varied argmaxes (not one repeated token).
    return jax.tree.map(lambda x: x * 5.0, init_params(CFG, jax.random.key(0)))


def test_greedy_kv_cache_matches_full_forward():
    params = _params()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    out = decoding.generate(CFG, params, prompts, max_new_tokens=7)
    full = jax.jit(lambda p, t: forward(CFG, p, t))
    for prompt, got in zip(prompts, out):
        seq, want = list(prompt), []
        for _ in range(7):
            token = int(jnp.argmax(full(params, jnp.asarray([seq]))[0, -1]))
            want.append(token)
            seq.append(token)
        assert got == want


def test_eos_stops_rows_and_pads_after():
    params = _params()
    prompts = [[1, 2, 3], [4, 5]]
    free = decoding.generate(CFG, params, prompts, max_new_tokens=6)
    # The first token of row 0 that did not occur before it becomes EOS.
    i = next(i for i in range(1, 6) if free[0][i] not in free[0][:i])
    eos = free[0][i]
    out = decoding.generate(CFG, params, prompts, max_new_tokens=6, eos_id=eos)
    assert out[0] == free[0][:i]
    assert eos not in out[1]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy():
    params = _params()
    prompts = [[1, 2, 3], [4, 5, 6]]
    a = decoding.generate(
        CFG, params, prompts, max_new_tokens=5, temperature=1.0, rng=jax.random.key(3)
    )
    b = decoding.generate(
        CFG, params, prompts, max_new_tokens=5, temperature=1.0, rng=jax.random.key(3)
    )
    assert a == b
    greedy = decoding.generate(CFG, params, prompts, max_new_tokens=5)
    nucleus = decoding.generate(
        CFG, params, prompts, max_new_tokens=5, temperature=1.0, top_p=1e-6, rng=jax.random.key(4)
    )
    assert nucleus == greedy


def test_one_compilation_per_shape_bucket():
    params = _params()
    decoding.generate_tokens._clear_cache()
    for prompts in ([[1, 2]], [[1, 2, 3]], [[4, 5, 6, 7, 8]]):  # all in the (1, 8) bucket
        decoding.generate(CFG, params, prompts, max_new_tokens=4)
    assert decoding.generate_tokens._cache_size() == 1


def test_left_pad_layout():
    tokens, mask = decoding.left_pad([[1, 2], [3]], 4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 1, 2], [0, 0, 0, 3]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])


def test_nucleus_threshold_matches_sorting():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 50)) * 3, jnp.float32)
    for top_p in (0.1, 0.5, 0.9, 0.99):
        threshold = decoding._nucleus_threshold(logits, top_p)
        kept = np.asarray(logits >= threshold)
        probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        for row in range(6):
            order = np.argsort(-probs[row])
            size = int(np.searchsorted(np.cumsum(probs[row][order]), top_p) + 1)
            assert set(np.flatnonzero(kept[row])) == set(order[:size]), (top_p, row)
