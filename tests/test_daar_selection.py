"""DaaR selection: top fraction, customized per-domain fractions, manifest + JSONL outputs."""

import json

import numpy as np
import pytest

from ideal_jax.daar import selection
from ideal_jax.data.domains import load_domains
from ideal_jax.data.records import Example
from ideal_jax.utils.errors import InputError


def test_top_fraction_breaks_ties_by_index():
    scores_n = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 0.0, 0.3, 0.4, 0.6, 0.7])
    np.testing.assert_array_equal(selection.select_top_fraction(scores_n, 0.2), [1, 3])
    np.testing.assert_array_equal(selection.select_top_fraction(scores_n, 0.35), [1, 3, 9, 8])
    with pytest.raises(InputError):
        selection.select_top_fraction(scores_n, 0.0)


def test_customized_takes_half_of_target_and_a_tenth_of_others():
    rng = np.random.default_rng(0)
    labels_n = np.repeat([0, 1, 2], [40, 20, 10])
    scores_n = rng.random(70)
    picked = selection.select_customized(scores_n, labels_n, target=1)
    np.testing.assert_array_equal(np.bincount(labels_n[picked], minlength=3), [4, 10, 1])
    best_of_1 = np.flatnonzero(labels_n == 1)[np.argsort(-scores_n[labels_n == 1])[:10]]
    assert set(picked[labels_n[picked] == 1]) == set(best_of_1)


def test_kl_to_uniform():
    assert selection.kl_to_uniform(np.array([0, 1, 2, 3]), 4) == pytest.approx(0.0)
    assert selection.kl_to_uniform(np.zeros(5, int), 4) == pytest.approx(np.log(4))


def test_write_selection_outputs_read_back(tmp_path):
    examples = [
        Example(f"ex{i}", "raw", (("user", f"q{i}"),), f"a{i}", capability="c") for i in range(6)
    ]
    scores_n = np.linspace(0, 1, 6)
    labels_n = np.array([0, 1, 0, 1, 0, 1])
    manifest_path, records_path = selection.write_selection(
        tmp_path / "sel",
        examples,
        np.array([5, 4]),
        scores_n,
        labels_n,
        ["alpha", "beta"],
        method="top_fraction",
        fractions={"all": 0.33},
        seed=3,
    )
    manifest = json.loads(open(manifest_path).read())
    assert manifest["counts_per_pseudo_domain"] == {"alpha": 1, "beta": 1}
    assert manifest["pool_counts_per_pseudo_domain"] == {"alpha": 3, "beta": 3}
    assert [s["id"] for s in manifest["selected"]] == ["ex5", "ex4"] and manifest["seed"] == 3
    loaded = load_domains(records_path)
    assert {d: [ex.id for ex in exs] for d, exs in loaded.items()} == {
        "alpha": ["ex4"],
        "beta": ["ex5"],
    }
    assert loaded["beta"][0].response == "a5" and loaded["beta"][0].capability == "c"
    assert not list((tmp_path / "sel").glob("*.tmp*"))


def test_per_domain_keeps_pool_proportions():
    labels_n = np.repeat([0, 1, 2], [40, 20, 10])
    scores_n = np.where(labels_n == 1, 10.0, 0.0) + np.arange(70) * 1e-3  # domain 1 dominates
    assert set(labels_n[selection.select_top_fraction(scores_n, 0.2)]) == {1}
    picked = selection.select_per_domain(scores_n, labels_n, 0.2)
    np.testing.assert_array_equal(np.bincount(labels_n[picked], minlength=3), [8, 4, 2])


def test_farthest_point_covers_every_distinct_point_before_a_duplicate():
    rng = np.random.default_rng(0)
    distinct_md = rng.normal(size=(6, 4)) * 5.0
    # A pool of 6 distinct points; points 0 and 1 are copied 20 times each (redundant clusters).
    x_nd = np.concatenate([distinct_md, np.repeat(distinct_md[:2], 20, axis=0)])
    picked = selection.select_farthest_point(x_nd, 6, seed=3)
    assert len(set(map(tuple, x_nd[picked].round(6)))) == 6  # one of each, no copy
    np.testing.assert_array_equal(picked, selection.select_farthest_point(x_nd, 6, seed=3))
    # Past the distinct points it takes copies, never an index twice.
    more = selection.select_farthest_point(x_nd, 30, seed=3)
    assert len(set(more.tolist())) == 30 and set(picked) <= set(more.tolist())
    # Greedy k-center on 3 well-separated blobs: the first 3 picks hit every blob.
    blob_n = np.repeat([0, 1, 2], [100, 10, 5])
    centres_kd = np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]])
    blobs_nd = centres_kd[blob_n] + rng.normal(size=(115, 2))
    assert set(blob_n[selection.select_farthest_point(blobs_nd, 3, seed=0)]) == {0, 1, 2}
    assert len(selection.select_farthest_point(blobs_nd, 500)) == 115
