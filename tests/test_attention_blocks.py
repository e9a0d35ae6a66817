"""Causal attention in query blocks (model/transformer.py causal_blocks): each block of query rows
stops at its own last key row. It must equal the one-block masked softmax exactly (logits and
gradients), on packed rows with padding, and match transformers on rows longer than a block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ideal_jax.model import hf_io, transformer
from ideal_jax.model.config import preset

VOCAB = 61


@pytest.mark.parametrize("t,block", [(1, 4), (7, 8), (8, 8), (9, 8), (200, 64), (256, 128)])
def test_causal_blocks_tile_the_rows(t, block):
    blocks = transformer.causal_blocks(t, True, block)
    assert blocks[0][0] == 0 and blocks[-1][1] == t
    if t <= block:
        assert blocks == [(0, t, None)]
        return
    for (q0, q1, s1), nxt in zip(blocks, blocks[1:] + [(t, None, None)]):
        assert q1 == nxt[0] and 0 < q1 - q0 <= block
        assert s1 == q1  # every key a row of the block can see, and none after its last row
    assert len(blocks) == -(-t // block)
    assert transformer.causal_blocks(t, False, block) == [(0, t, None)]


def _packed_batch(t: int, seed: int = 0):
    """Two rows: three packed segments then padding, and one segment over the whole row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (2, t))
    cuts = [0, 37, 90, t - 13]
    seg = np.zeros((2, t), np.int32)
    pos = np.zeros((2, t), np.int32)
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        seg[0, a:b] = i + 1
        pos[0, a:b] = np.arange(b - a)
    seg[1] = 1
    pos[1] = np.arange(t)
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _loss_and_grads(cfg, params, tokens, pos, seg):
    def loss(p):
        logits = transformer.forward(cfg, p, tokens, pos, seg)
        return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2) * 1e-3, logits

    # jitted here (a fresh function per call): the block size is read when the attention traces
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def test_blocked_attention_equals_one_block(monkeypatch):
    cfg = preset("tiny", VOCAB)
    params = transformer.init_params(cfg, jax.random.key(0))
    t = 150  # 5 blocks of 32, the last one partial
    batch = _packed_batch(t)
    monkeypatch.setattr(transformer, "ATTENTION_BLOCK", 32)
    assert len(transformer.causal_blocks(t, True)) == 5
    logits_b, grads_b = _loss_and_grads(cfg, params, *batch)
    monkeypatch.setattr(transformer, "ATTENTION_BLOCK", 10**6)
    assert len(transformer.causal_blocks(t, True)) == 1
    logits_1, grads_1 = _loss_and_grads(cfg, params, *batch)
    np.testing.assert_allclose(np.asarray(logits_b), np.asarray(logits_1), rtol=0, atol=2e-5)
    flat_b, flat_1 = jax.tree.leaves(grads_b), jax.tree.leaves(grads_1)
    for gb, g1 in zip(flat_b, flat_1):
        scale = float(np.max(np.abs(np.asarray(g1)))) + 1e-12
        np.testing.assert_allclose(np.asarray(gb), np.asarray(g1), rtol=0, atol=1e-5 * scale)


@pytest.mark.integration
def test_rows_longer_than_a_block_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "m")
    cfg = hf_io.load_hf_config(str(tmp_path / "m"))
    params = hf_io.load_hf_params(str(tmp_path / "m"), cfg)
    t = transformer.ATTENTION_BLOCK + 75
    assert len(transformer.causal_blocks(t, True)) == 2
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, t))
    ours = np.asarray(jax.jit(lambda p, x: transformer.forward(cfg, p, x))(params, tokens))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
