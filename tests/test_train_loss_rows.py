"""Training forms its loss at the rows that carry weight only (the output head at K of T rows):
the same loss, gradients and per-domain sums as at every row, and a K no packed row exceeds."""

import jax
import numpy as np
import pytest

from ideal_jax.data import batching
from ideal_jax.data.formatting import TokenizedExample
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params
from ideal_jax.train import finetuning as finetuning_lib
from ideal_jax.train import step as step_lib

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, head_dim=8
)
NUM_DOMAINS = 3
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _batch(seed: int, rows: int = 6, seq_len: int = 24) -> dict[str, np.ndarray]:
    """Packed rows of 1-3 examples; some rows carry weight at position 0 (a filler slot of
    add_loss_positions points there too), some rows are all padding."""
    rng = np.random.default_rng(seed)
    b = {
        "tokens": rng.integers(0, CFG.vocab_size, (rows, seq_len)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (rows, seq_len)).astype(np.int32),
        "weights": np.zeros((rows, seq_len), np.float32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
        "domain_ids": np.full((rows, seq_len), -1, np.int32),
    }
    for r in range(rows - 1):  # the last row stays padding
        start = 0
        for seg in range(1, int(rng.integers(1, 4)) + 1):
            length = int(rng.integers(2, seq_len // 3))
            span = slice(start, start + length)
            b["segment_ids"][r, span] = seg
            b["positions"][r, span] = np.arange(length)
            b["domain_ids"][r, span] = rng.integers(0, NUM_DOMAINS)
            prompt = 0 if r % 2 == 0 and seg == 1 else int(rng.integers(1, length))
            b["weights"][r, start + prompt : start + length - 1] = 1.0
            start += length
    return b


@pytest.mark.parametrize("finetuning", ["full", "freeze"])
def test_loss_at_loss_rows_equals_loss_at_every_row(finetuning):
    params = init_params(CFG, jax.random.key(0))
    spec = None
    if finetuning == "freeze":
        spec = finetuning_lib.Finetuning("freeze", CFG.num_layers, trainable_layers=1)
    batch = _batch(0)
    counts = (batch["weights"] > 0).sum(axis=1)
    k = int(counts.max()) + 3  # filler slots in every row
    assert k < batch["weights"].shape[1] and batch["weights"][0, 0] > 0
    positioned = batching.add_loss_positions(batch, k)
    assert positioned[batching.LOSS_POSITIONS].shape == (6, k)

    def sums(b):
        return jax.jit(
            lambda p, x: step_lib._microbatch_sums(CFG, NUM_DOMAINS, p, x, spec),
            compiler_options=FAST_COMPILE,  # both sides alike
        )(params, b)

    grads_all, stats_all = sums(batch)
    grads_k, stats_k = sums(positioned)
    for key in ("loss_sum", "tokens", "examples", "domain_loss_sums", "domain_tokens"):
        np.testing.assert_allclose(stats_k[key], stats_all[key], rtol=1e-5, atol=1e-6)
    assert float(stats_all["loss_sum"]) > 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads_k, grads_all
    )


def _example(rng, domain="d") -> TokenizedExample:
    length = int(rng.integers(3, 20))
    mask = np.zeros(length, bool)
    mask[int(rng.integers(1, length)) :] = True
    ids = rng.integers(0, 50, length).astype(np.int32)
    return TokenizedExample(
        input_ids=ids, loss_mask=mask, example_id=str(rng.random()), domain=domain
    )


def test_loss_rows_bound_holds_for_every_packing():
    """However the examples are shuffled and packed, no row has more weighted tokens than the
    bound; and the bound is not vacuous (below seq_len for short responses)."""
    rng = np.random.default_rng(1)
    examples = [_example(rng) for _ in range(200)]
    seq_len = 64
    k = batching.loss_rows_bound(examples, seq_len)
    most = 0
    for seed in range(6):
        for b in batching.iterate_batches(examples, 8, seq_len, mode="pack", seed=seed, epoch=0):
            batching.add_loss_positions(b, k)  # raises when a row exceeds k
            most = max(most, int((b["weights"] > 0).sum(axis=1).max()))
    assert most <= k <= seq_len
    # One example whose response is 15 of its 16 tokens: packed rows of it reach 60 of 64.
    dense = TokenizedExample(np.arange(16, dtype=np.int32), np.r_[False, [True] * 15], "x", "d")
    assert batching.loss_rows_bound([dense] * 8, seq_len) == 64
    short = TokenizedExample(
        np.arange(16, dtype=np.int32), np.r_[[False] * 14, True, True], "y", "d"
    )
    assert batching.loss_rows_bound([short] * 8, seq_len) == 8
