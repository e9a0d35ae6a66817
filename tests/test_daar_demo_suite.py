"""DaaR on the demo suite with its labels hidden (slow): pseudo-domains recover the capabilities.

The generator is scripted from the suite's own item generators (a perfect "instruct model"); the
base model is a tiny random-init decoder. Measured when written: probe-set purity 0.996, pool
purity 1.0, ψ_dom val accuracy 1.0, ψ_div val correlation 0.92, mean ψ_dom entropy of the top-20%
0.072 vs 0.021 for a random 20%. The global top-20% is *not* domain-balanced here (133 of 150 from
"reverse", the capability closest to "uppercase"); the per-domain variant keeps the pool's
proportions.
"""

import random

import jax
import numpy as np
import pytest

from configs import common
from ideal_jax.daar import generation, pipeline, selection
from ideal_jax.data import demo_suite, demo_tasks
from ideal_jax.data.domains import load_domains
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params

CAPS = list(demo_suite.COPY_CAPABILITIES)  # SIZES: the copy family
SIZES = {"arithmetic": 100, "reverse": 500, "sort": 250, "lookup": 200, "uppercase": 400}


def respond(prompt: str, rng: random.Random) -> str:
    for cap in CAPS:
        if f"capability {cap}." in prompt:
            question, answer = demo_tasks.GENERATORS[cap](rng)
            return f"Instruction: {question}\nResponse: {answer}"
    return "unknown domain"


def purity(labels_n, hidden_n):
    return sum(np.bincount(hidden_n[labels_n == k]).max() for k in np.unique(labels_n)) / len(
        labels_n
    )


@pytest.mark.slow
def test_demo_suite_pseudo_domains_recover_capabilities(tmp_path):
    from transformers import AutoTokenizer

    paths = demo_suite.build_demo_suite(
        tmp_path / "suite", seed=0, train_sizes=SIZES, n_test=5, n_ref=5
    )
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    examples = [ex for exs in load_domains(paths["train"]).values() for ex in exs]
    random.Random(0).shuffle(examples)
    probe, pool = examples[:700], examples[700:]
    section = common.base_config().daar.to_dict()
    section.update(
        domains={c: f"tasks of the capability {c}." for c in CAPS},
        tau={c: 0.99 for c in CAPS},
        target_per_domain=10,
        feature_layer=2,
        max_len=64,
        probe_epochs=8,
    )
    model_cfg = ModelConfig(vocab_size=len(tokenizer), num_layers=2)
    params = jax.jit(init_params, static_argnums=0)(model_cfg, jax.random.key(0))
    result = pipeline.run_daar(
        section,
        model_cfg,
        params,
        tokenizer,
        pool,
        probe,
        tmp_path / "daar",
        generator=generation.ScriptedGenerator(respond),
    )
    probe_hidden = np.array([CAPS.index(ex.domain) for ex in probe])
    pool_hidden = np.array([CAPS.index(ex.domain) for ex in pool])
    assert purity(result.probe_labels_n, probe_hidden) >= 0.95
    assert np.mean(result.pool_labels_n == pool_hidden) >= 0.95  # cluster k is capability k
    assert result.probe_stats["domain"]["val_accuracy"] >= 0.95
    sel_n = result.selected_n
    rand_n = np.random.default_rng(0).choice(len(pool), len(sel_n), replace=False)
    assert result.pool_entropy_n[sel_n].mean() > result.pool_entropy_n[rand_n].mean()
    # The per-domain variant: the pool's proportions, up to rounding.
    per_domain = selection.select_per_domain(result.pool_scores_n, result.pool_labels_n, 0.2)
    counts = np.bincount(result.pool_labels_n, minlength=5)
    got = np.bincount(result.pool_labels_n[per_domain], minlength=5)
    np.testing.assert_array_equal(got, np.maximum(1, np.floor(counts * 0.2 + 0.5)).astype(int))
