"""The DaaR benchmark pools: the premise pool's structure, and the charset pool's ambiguity."""

import collections
import json

import numpy as np

from ideal_jax.daar import demo_pools
from ideal_jax.daar.centroids import example_text
from ideal_jax.data.domains import load_domains


def test_premise_pool_is_redundant_in_the_head_distinct_in_the_tail_and_disjoint(tmp_path):
    pp = demo_pools.build_premise_pool(tmp_path, seed=1, n_pool=400, n_probe=200, head_unique=8)
    assert sum(pp.sizes.values()) == len(pp.pool) == 400 and len(pp.probe) == 200
    assert pp.sizes == {
        "reverse": 180,
        "uppercase": 160,
        "arithmetic": 20,
        "sort": 20,
        "lookup": 20,
    }
    texts = collections.defaultdict(list)
    for ex in pp.pool:
        texts[ex.domain].append(example_text(ex))
    for cap in demo_pools.HEAD:  # 8 distinct items, each copied many times
        assert len(set(texts[cap])) == pp.unique[cap] == 8
    for cap in demo_pools.TAIL:  # every example distinct
        assert len(set(texts[cap])) == len(texts[cap]) == 20
    # The probe set has the pool's mixture, with texts disjoint from the pool's.
    probe_counts = collections.Counter(ex.domain for ex in pp.probe)
    assert probe_counts == {
        "reverse": 90,
        "uppercase": 80,
        "arithmetic": 10,
        "sort": 10,
        "lookup": 10,
    }
    pool_texts = {example_text(ex) for ex in pp.pool}
    assert not pool_texts & {example_text(ex) for ex in pp.probe}
    # Written in the demo layout: train files read back as the pool, test prompts unseen.
    loaded = load_domains({c: f"{tmp_path}/train/{c}.jsonl" for c in pp.sizes})
    assert {c: len(v) for c, v in loaded.items()} == pp.sizes
    for cap in pp.sizes:  # the test split is unseen: no test prompt is a pool prompt
        with open(f"{tmp_path}/test/{cap}.jsonl") as f:
            test_prompts = {json.loads(line)["prompt"] for line in f}
        assert len(test_prompts) == 50
        assert not test_prompts & {ex.messages[0][1] for ex in pp.pool if ex.domain == cap}
    assert all(ex.domain == "pool" for ex in pp.hidden(pp.pool))
    again = demo_pools.build_premise_pool(
        tmp_path / "again", seed=1, n_pool=400, n_probe=200, head_unique=8
    )
    assert [example_text(ex) for ex in again.pool] == [example_text(ex) for ex in pp.pool]


def test_charset_pool_priors_and_purity():
    examples, hidden = demo_pools.charset_pool(2000, seed=0, prefix="x")
    counts = np.bincount(hidden, minlength=4) / 2000
    np.testing.assert_allclose(counts, demo_pools.CHARSET_PRIOR, atol=0.03)
    assert len({ex.id for ex in examples}) == 2000
    hidden_n = np.array(hidden)
    assert demo_pools.purity(hidden_n, hidden_n) == 1.0
    # One cluster for everything: purity = the largest prior.
    assert abs(demo_pools.purity(np.zeros(2000, int), hidden_n) - counts.max()) < 1e-9
