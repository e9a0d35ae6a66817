"""β → resampled mixture: sizes, resampling, determinism, identity, keep_total, host slices."""

import json
import math
from collections import Counter

import numpy as np
import pytest

from ideal_jax.data import mixture as mx
from ideal_jax.data.domains import load_domains
from ideal_jax.data.records import Example
from ideal_jax.utils.errors import InputError

SIZES = {"math": 10, "code": 37, "chat": 120}
IDS = {d: [f"{d}:{i}" for i in range(n)] for d, n in SIZES.items()}
BETA = {"math": 0.15, "code": -0.7, "chat": 1.35}


def test_target_sizes_are_floor_of_weighted_sizes():
    mixture = mx.build_mixture(IDS, BETA, seed=0)
    expected = [math.floor((1 + BETA[d]) * SIZES[d] + 1e-9) for d in SIZES]
    assert list(mixture.target_sizes) == expected == [11, 11, 282]
    assert [len(ids) for ids in mixture.example_ids] == expected
    # float error must not lose an example: (1 - 0.9) * 10 is 0.9999999999999998 in floating point
    assert mx.compute_target_sizes([10], [-0.9])[0] == [1]


def test_down_and_upsampling_rules():
    mixture = mx.build_mixture(IDS, BETA, seed=1)
    code = Counter(mixture.example_ids[1])
    assert len(code) == 11 and set(code.values()) == {1}  # without replacement
    assert set(code) <= set(IDS["code"])
    chat = Counter(mixture.example_ids[2])  # 282 = 2 whole copies of 120 + 42 drawn once more
    assert sorted(Counter(chat.values()).items()) == [(2, 78), (3, 42)]
    manifest = mixture.to_manifest()
    assert manifest["domains"]["chat"]["repeat_counts"] == {"0": 0, "2": 78, "3": 42}
    assert manifest["domains"]["code"]["repeat_counts"] == {"0": 26, "1": 11}
    for name, entry in manifest["domains"].items():
        counts = entry["repeat_counts"]
        assert sum(counts.values()) == entry["source_size"] == SIZES[name]
        assert sum(int(r) * c for r, c in counts.items()) == entry["target_size"]
        assert entry["weight"] == pytest.approx(1 + BETA[name])


def test_same_seed_same_mixture_other_seed_differs():
    a = mx.build_mixture(IDS, BETA, seed=5)
    b = mx.build_mixture(dict(IDS), dict(BETA), seed=5)
    c = mx.build_mixture(IDS, BETA, seed=6)
    assert a == b
    assert mx.global_order(a) == mx.global_order(b)
    assert a.example_ids != c.example_ids
    assert a.target_sizes == c.target_sizes


def test_beta_zero_is_identity():
    for beta in (None, {d: 0.0 for d in IDS}, [0.0, 0.0, 0.0]):
        mixture = mx.build_mixture(IDS, beta, seed=3)
        assert mixture.example_ids == tuple(tuple(IDS[d]) for d in IDS)
        assert mixture.target_sizes == tuple(SIZES.values())
    kept = mx.build_mixture(IDS, None, seed=3, keep_total=True)
    assert kept.example_ids == tuple(tuple(IDS[d]) for d in IDS)


@pytest.mark.parametrize("seed", range(5))
def test_keep_total_preserves_total(seed):
    rng = np.random.default_rng(seed)
    beta = dict(zip(IDS, rng.uniform(-0.9, 2.0, size=3).tolist()))
    mixture = mx.build_mixture(IDS, beta, seed=seed, keep_total=True)
    total_n = sum(SIZES.values())
    assert mixture.total == total_n == sum(len(ids) for ids in mixture.example_ids)
    assert sum(mixture.unrounded_targets) == pytest.approx(total_n)
    # rounding moves each domain by less than one example
    assert np.all(np.abs(np.subtract(mixture.target_sizes, mixture.unrounded_targets)) < 1)
    # relative volumes follow (1 + β): the ratio to the un-rescaled targets is one common factor
    raw = np.array([(1 + beta[d]) * SIZES[d] for d in IDS])
    np.testing.assert_allclose(np.array(mixture.unrounded_targets) / raw, total_n / raw.sum())


def test_bad_beta_is_input_error():
    with pytest.raises(InputError, match="'beta'"):
        mx.build_mixture(IDS, {"math": -1.5}, seed=0)
    with pytest.raises(InputError, match="unknown domains \\['bio'\\]"):
        mx.build_mixture(IDS, {"bio": 0.1}, seed=0)
    with pytest.raises(InputError, match="2 β values for 3 domains"):
        mx.build_mixture(IDS, [0.1, 0.2], seed=0)


@pytest.mark.parametrize("host_count", [1, 2, 3, 4])
def test_host_shards_partition_the_global_order(host_count):
    mixture = mx.build_mixture(IDS, BETA, seed=2)
    order = mx.global_order(mixture)
    assert len(order) == mixture.total
    assert Counter(order) == Counter(
        (d, i) for d, ids in zip(mixture.domain_names, mixture.example_ids) for i in ids
    )
    shards = [mx.host_shard(order, h, host_count) for h in range(host_count)]
    positions = [list(range(len(order)))[h::host_count] for h in range(host_count)]
    assert sorted(p for ps in positions for p in ps) == list(
        range(len(order))
    )  # disjoint, complete
    for shard, pos in zip(shards, positions):
        assert shard == [order[p] for p in pos]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_manifest_round_trip(tmp_path):
    mixture = mx.build_mixture(IDS, BETA, seed=9, keep_total=True)
    path = tmp_path / "round_1" / "mixture.json"
    mx.write_manifest(mixture, path)
    manifest = json.loads(path.read_text())
    assert manifest["seed"] == 9 and manifest["keep_total"] is True
    assert manifest["total_target"] == manifest["total_source"] == sum(SIZES.values())
    assert mx.read_manifest(path) == mixture
    assert mx.Mixture.from_manifest(mixture.to_manifest()) == mixture
    broken = mixture.to_manifest()
    del broken["domains"]["code"]["beta"]
    with pytest.raises(InputError, match="'beta'"):
        mx.Mixture.from_manifest(broken, path="m.json")


def _examples():
    return {
        d: [Example(i, d, (("user", f"q {i}"),), f"a {i}", None, "src") for i in ids]
        for d, ids in IDS.items()
    }


def test_materialize_and_export_jsonl(tmp_path):
    examples = _examples()
    mixture = mx.build_mixture(IDS, BETA, seed=4)
    items = mx.materialize(mixture, examples)
    assert [ex.id for ex in items] == [i for ids in mixture.example_ids for i in ids]
    path = tmp_path / "final_mixture.jsonl"
    assert mx.export_jsonl(mixture, examples, path) == mixture.total
    assert not list(tmp_path.glob("*.tmp*"))  # written through a temporary file, then renamed
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == mixture.total
    first = lines[0]
    assert first["messages"][-1]["role"] == "assistant"
    assert first["messages"][-1]["content"] == "a " + first.get("source_id", first["id"])
    reloaded = load_domains(path, domain_names=list(IDS))  # unique ids: loads back as plain data
    assert {d: len(v) for d, v in reloaded.items()} == dict(zip(IDS, mixture.target_sizes))
    missing = {d: v[:1] for d, v in examples.items()}
    with pytest.raises(InputError, match="not among the loaded examples"):
        mx.export_jsonl(mixture, missing, tmp_path / "x.jsonl")


def _d1():
    """A D_k with repeats: math upsampled (×2 + 3), code downsampled."""
    return mx.build_mixture(IDS, {"math": 1.3, "code": -0.5, "chat": 0.0}, seed=11)


def test_nested_resampling_same_volume_is_d_k():
    d1 = _d1()
    d2 = mx.resample_from(d1, d1.target_sizes, seed=99)
    assert d2.example_ids == d1.example_ids
    assert d2.step_beta == (0.0, 0.0, 0.0)


def test_nested_resampling_drops_and_duplicates_entries_of_d_k():
    d1 = _d1()
    volumes = [d1.target_sizes[0] - 5, d1.target_sizes[1] + 30, d1.target_sizes[2]]
    d2 = mx.resample_from(d1, volumes, seed=7, beta_nominal=[-0.2, 1.6, 0.0])
    before = [Counter(ids) for ids in d1.example_ids]
    after = [Counter(ids) for ids in d2.example_ids]
    # Shrinking: a sub-multiset of D_k (entries dropped, nothing new, repeats never exceed D_k's).
    assert sum(after[0].values()) == volumes[0] and not after[0] - before[0]
    # Growing: D_k whole plus duplicates of D_k's own entries; never an id D_k did not hold.
    assert not before[1] - after[1] and set(after[1]) <= set(before[1])
    assert sum(after[1].values()) == volumes[1]
    assert d2.example_ids[2] == d1.example_ids[2]  # β = 0 domain untouched
    assert d2.step_beta[0] == pytest.approx(volumes[0] / d1.target_sizes[0] - 1)
    assert d2.step_beta_nominal == (-0.2, 1.6, 0.0)
    assert d2.beta[1] == pytest.approx(volumes[1] / SIZES["code"] - 1)  # cumulative vs source
    again = mx.resample_from(d1, volumes, seed=7)
    assert again.example_ids == d2.example_ids  # deterministic per seed
    back = mx.Mixture.from_manifest(json.loads(json.dumps(d2.to_manifest())))
    assert back.step_beta == d2.step_beta and back.example_ids == d2.example_ids


def test_sigma_subsample_follows_the_mixture_multiplicities():
    """β = (+1, −0.5): mixture shares 0.8 / 0.2; the σ-subsample must have the same shares."""
    from types import SimpleNamespace

    from ideal_jax.data.formatting import TokenizedExample
    from ideal_jax.influence.stage import sigma_subsample

    ids = {"a": [f"a{i}" for i in range(100)], "b": [f"b{i}" for i in range(100)]}
    tok = lambda d, i: TokenizedExample(np.ones(4, np.int32), np.ones(4, bool), i, d)
    suite = SimpleNamespace(tokenized={d: [tok(d, i) for i in v] for d, v in ids.items()})
    mix = mx.build_mixture(ids, {"a": 1.0, "b": -0.5}, seed=0)
    sub = sigma_subsample(suite, mix, 0.5, seed=0)
    counts = Counter(t.domain for t in sub)
    assert counts["a"] / len(sub) == pytest.approx(0.8, abs=0.01)
    # Within a domain, repeats of the mixture can be drawn more than once (with multiplicity).
    assert max(Counter(t.example_id for t in sub if t.domain == "a").values()) == 2
