"""Subsample by budget: a fixed number of mixture entries per domain, with multiplicity."""

from collections import Counter
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest

from ideal_jax.data import mixture as mx
from ideal_jax.data.formatting import TokenizedExample
from ideal_jax.influence import stage
from ideal_jax.utils.errors import InputError


def _suite(sizes):
    ids = {d: [f"{d}{i}" for i in range(n)] for d, n in sizes.items()}
    tok = lambda d, i: TokenizedExample(np.ones(4, np.int32), np.ones(4, bool), i, d)
    return ids, SimpleNamespace(tokenized={d: [tok(d, i) for i in v] for d, v in ids.items()})


def _curv(per_domain, sigma=0.5, subsample="fixed", allocation="per_domain"):
    return ml_collections.ConfigDict(
        {
            "sigma": sigma,
            "examples_per_domain": per_domain,
            "subsample": subsample,
            "allocation": allocation,
        }
    )


def test_budget_is_a_fixed_count_per_domain_drawn_with_multiplicity():
    ids, suite = _suite({"a": 100, "b": 400})
    mix = mx.build_mixture(ids, {"a": 1.0, "b": 0.0}, seed=0)  # a: every example twice
    sub, info = stage.subsample(suite, mix, _curv(60), seed=0)
    counts = Counter(t.domain for t in sub)
    assert counts == {"a": 60, "b": 60} and info["domains_used_whole"] == []
    # drawn from the mixture's entries: a repeated example can be drawn twice
    assert max(Counter(t.example_id for t in sub if t.domain == "a").values()) == 2
    # the cost is flat in the data: ten times the data, the same subsample size
    ids10, suite10 = _suite({"a": 1000, "b": 4000})
    mix10 = mx.build_mixture(ids10, {"a": 1.0, "b": 0.0}, seed=0)
    assert len(stage.subsample(suite10, mix10, _curv(60), seed=0)[0]) == 120
    # proportional: as many curvature entries (120), split as the mixture's entries (200 : 400)
    sub_p, info_p = stage.subsample(suite, mix, _curv(60, allocation="proportional"), seed=0)
    assert Counter(t.domain for t in sub_p) == {"a": 40, "b": 80}
    assert info_p["curvature_examples"] == {"a": 40, "b": 80}
    # 0 = the σ fraction, as before
    sub_sigma, info = stage.subsample(suite, mix, _curv(0), seed=0)
    assert Counter(t.domain for t in sub_sigma) == {"a": 100, "b": 200} and info == {"sigma": 0.5}


def test_budget_larger_than_a_domain_uses_it_whole_and_says_so():
    ids, suite = _suite({"a": 10, "b": 400})
    mix = mx.build_mixture(ids, {"a": 0.0, "b": 0.0}, seed=0)
    sub, info = stage.subsample(suite, mix, _curv(50), seed=0)
    assert Counter(t.domain for t in sub) == {"a": 10, "b": 50}
    assert info["domains_used_whole"] == ["a"]
    with pytest.raises(InputError, match="examples_per_domain"):
        stage.subsample(suite, mix, _curv(-3), seed=0)
