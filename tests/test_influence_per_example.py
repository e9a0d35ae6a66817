"""Per-example influence: streamed scores average (token-weighted) to the domain's α."""

import jax
import numpy as np

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import operators
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients, per_example
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params


def _batch(rng, rows, length, vocab, group):
    tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    lengths = rng.integers(4, length + 1, rows)
    segment = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    weights = segment.astype(np.float32)
    weights[:, :2] = 0.0  # a "prompt" that does not count
    weights[:, -1] = 0.0
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "weights": weights * segment,
        "segment_ids": segment,
        "positions": np.tile(np.arange(length), (rows, 1)),
        "domain_ids": np.where(segment > 0, group, -1).astype(np.int32),
    }


def test_per_example_scores_average_to_domain_alpha():
    cfg = ModelConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    params = jax.tree.map(lambda x: 3 * x, init_params(cfg, jax.random.key(0)))
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    rng = np.random.default_rng(0)
    domains = [[_batch(rng, 4, 12, 40, g) for _ in range(2)] for g in range(2)]
    reference = [_batch(rng, 4, 12, 40, 0)]
    ref = gradients.single_group_mean_gradients(
        problem, params, [(0, b) for b in reference], ["all"]
    )
    dom = gradients.single_group_mean_gradients(
        problem, params, [(g, b) for g, bs in enumerate(domains) for b in bs], ["a", "b"]
    )
    identity = operators.build_operator("identity", problem=problem, params=params)
    alpha = alpha_lib.compute_alpha(ref, dom, identity, layers=problem.layers).row("all")
    v = identity(ref.overall)
    for g, batches in enumerate(domains):
        scores = per_example.per_example_scores(problem, params, batches, [v])
        weights = np.concatenate([b["weights"].sum(axis=1) for b in batches])
        assert scores.shape == (8, 1)
        np.testing.assert_allclose(
            np.sum(scores[:, 0] * weights) / weights.sum(), alpha[g], rtol=1e-4
        )
    # Streaming: the iterator yields one [B, R] block per batch and nothing more is kept.
    blocks = list(per_example.iter_scores(problem, params, domains[0], [v, v]))
    assert [b.shape for b in blocks] == [(4, 2), (4, 2)]
