"""Source pools larger than D0 (data.upsample, data.initial_sizes), the demo's dev/test split and
the equal training budget (train.budget) — issue "An honest comparison"."""

import hashlib
import json

import numpy as np
import pytest

from ideal_jax.compare import baselines
from ideal_jax.data import demo_suite, mixture
from ideal_jax.data.records import Example
from ideal_jax.utils.errors import InputError


def _ids(name, n):
    return [f"{name}:{i}" for i in range(n)]


# sha256 of the manifests that the code before pools existed wrote for this exact sequence (the
# paper's `repeat` behaviour): D0 of three domains, two nested steps, one uniform baseline.
TODAY = {
    "d0": "01a7aac2fd4cf593bdee1cd253e890bb20062f3ceb5db9fb9a33d7082133532a",
    "d1": "e7e97a1cfadf126b7ccffa9d120d6da0712697a675f89aac4f6ce765d6dee637",
    "d2": "56ecc0bd90f57abac105bcbbb0a5cb9da1f8373045d59b2843c319b89d8a012f",
    "uniform": "6892131011acfd725e2867afcbe3f58701fa362fca83bfac0f2fbbe30316b85c",
}


def _digest(mix):
    text = json.dumps(mix.to_manifest(), indent=1) + "\n"
    return hashlib.sha256(text.encode()).hexdigest()


def test_repeat_reproduces_the_mixtures_written_before_pools_byte_for_byte():
    ids = {"a": _ids("a", 37), "b": _ids("b", 120), "c": _ids("c", 9)}
    d0 = mixture.build_mixture(ids, None, seed=3, keep_total=True)
    d1 = mixture.resample_from(d0, [30, 150, 22], seed=4, beta_nominal=[-0.2, 0.25, 1.4])
    d2 = mixture.resample_from(d1, [10, 140, 52], seed=5, upsample="repeat")
    uniform = baselines.mixture_from_weights(ids, [1 / 3, 1 / 3, 1 / 3], 166, 3)
    got = {"d0": _digest(d0), "d1": _digest(d1), "d2": _digest(d2), "uniform": _digest(uniform)}
    assert got == TODAY


def _pooled_d0(pool_sizes, d0_sizes, seed=0):
    pools = {n: _ids(n, k) for n, k in pool_sizes.items()}
    shares = mixture.initial_shares(pools, d0_sizes, seed=seed)
    d0 = mixture.build_mixture(
        shares, None, seed=seed, keep_total=True, pools=pools, upsample="fresh_first"
    )
    return pools, d0


def test_fresh_first_takes_unused_examples_before_any_repeat_with_exact_counts():
    pools, d0 = _pooled_d0({"a": 50, "b": 40}, {"a": 10, "b": 40})
    assert d0.target_sizes == (10, 40)
    # a grows 10 -> 25: 15 fresh examples of its pool, no repeat, D0's ten all kept.
    d1 = mixture.resample_from(d0, [25, 30], seed=1, pools=pools, upsample="fresh_first")
    a1 = d1.example_ids[0]
    assert len(a1) == 25 and len(set(a1)) == 25
    assert set(d0.example_ids[0]) <= set(a1) and set(a1) <= set(pools["a"])
    manifest = d1.to_manifest()["domains"]
    assert (manifest["a"]["fresh"], manifest["a"]["repeated"], manifest["a"]["unused"]) == (
        15,
        0,
        25,
    )
    assert manifest["a"]["pool_size"] == 50
    # b shrank 40 -> 30: nothing fresh, nothing repeated, 10 of its pool unused.
    assert (manifest["b"]["fresh"], manifest["b"]["repeated"], manifest["b"]["unused"]) == (
        0,
        0,
        10,
    )
    # a grows 25 -> 60: the 25 unused first (pool exhausted), then 10 repeats.
    d2 = mixture.resample_from(d1, [60, 30], seed=2, pools=pools, upsample="fresh_first")
    a2 = d2.to_manifest()["domains"]["a"]
    assert (a2["fresh"], a2["repeated"], a2["unused"]) == (25, 10, 0)
    assert set(d2.example_ids[0]) == set(pools["a"])
    # Under `repeat` the same step only duplicates D1's own entries.
    r2 = mixture.resample_from(d1, [60, 30], seed=2, pools=pools, upsample="repeat")
    assert set(r2.example_ids[0]) == set(a1)


def test_growing_and_shrinking_keep_the_mixture_nested():
    pools, d0 = _pooled_d0({"a": 80, "b": 80, "c": 30}, {"a": 20, "b": 60, "c": 30})
    d1 = mixture.resample_from(d0, [45, 35, 30], seed=7, pools=pools, upsample="fresh_first")
    for before, after in zip(d0.example_ids, d1.example_ids):
        small, large = sorted((before, after), key=len)
        from collections import Counter

        assert not Counter(small) - Counter(large)  # the smaller is contained in the larger
    assert d1.example_ids[2] == d0.example_ids[2]  # an unchanged volume is D_k exactly


def test_the_pool_fields_survive_the_manifest_round_trip(tmp_path):
    pools, d0 = _pooled_d0({"a": 50, "b": 40}, {"a": 10, "b": 20})
    d1 = mixture.resample_from(d0, [20, 10], seed=1, pools=pools, upsample="fresh_first")
    path = tmp_path / "mixture.json"
    mixture.write_manifest(d1, path)
    back = mixture.read_manifest(path)
    assert back == d1


def test_d0_share_larger_than_its_source_is_refused_naming_domain_and_sizes():
    pools = {"math": _ids("math", 12), "code": _ids("code", 30)}
    with pytest.raises(InputError) as e:
        mixture.initial_shares(pools, {"math": 20}, seed=0)
    assert e.value.field == "data.initial_sizes.math"
    assert "20" in str(e.value) and "12" in str(e.value) and "math" in str(e.value)
    with pytest.raises(InputError) as e:
        mixture.initial_shares(pools, {"poetry": 3}, seed=0)
    assert e.value.field == "data.initial_sizes"
    shares = mixture.initial_shares(pools, {"code": 10}, seed=0)
    assert len(shares["code"]) == 10 and shares["math"] == pools["math"]
    assert shares["code"] == sorted(shares["code"], key=pools["code"].index)  # pool order


def test_an_unknown_upsample_policy_is_refused_naming_the_field():
    _, d0 = _pooled_d0({"a": 5}, {})
    with pytest.raises(InputError) as e:
        mixture.resample_from(d0, [6], seed=0, upsample="fresh")
    assert e.value.field == "data.upsample"


def test_a_baseline_grows_its_domains_from_the_pool_too():
    pools = {"a": _ids("a", 100), "b": _ids("b", 100)}
    d0_ids = {"a": pools["a"][:20], "b": pools["b"][:80]}
    mix = baselines.mixture_from_weights(
        d0_ids, [0.5, 0.5], 100, 0, pools=pools, upsample="fresh_first"
    )
    assert mix.target_sizes == (50, 50)
    assert len(set(mix.example_ids[0])) == 50  # 30 fresh, no repeat
    assert set(d0_ids["a"]) <= set(mix.example_ids[0])
    repeat = baselines.mixture_from_weights(d0_ids, [0.5, 0.5], 100, 0)
    assert len(set(repeat.example_ids[0])) == 20


@pytest.mark.parametrize("seed", range(5))
def test_demo_reference_rows_are_never_test_rows(tmp_path, seed):
    from configs import demo

    cfg = demo.get_config()
    paths = demo_suite.build_demo_suite(
        tmp_path,
        seed=seed,
        train_sizes=dict(cfg.data.demo_train_sizes),
        n_test=cfg.data.demo_n_test,
        n_ref=cfg.data.demo_n_ref,
        pool_factor=cfg.data.demo_pool_factor,
    )
    test = demo_suite.load_eval_items(tmp_path, "test")
    ref = demo_suite.load_eval_items(tmp_path, "ref")
    assert set(test) == set(ref) == set(demo_suite.TABLE_CAPABILITIES)
    for cap in test:
        test_prompts = {i.prompt for i in test[cap]}
        ref_prompts = {i.prompt for i in ref[cap]}
        assert not test_prompts & ref_prompts, cap
        assert len(ref_prompts) == cfg.data.demo_n_ref and len(test_prompts) == 40
    # Each source holds its pool: 4x D0's share, every row of the table at least once.
    for cap, n in cfg.data.demo_train_sizes.items():
        lines = open(paths["train"][cap]).read().splitlines()
        assert len(lines) == cfg.data.demo_pool_factor * n
        if cap in demo_suite.TABLE_CAPABILITIES:
            prompts = {json.loads(x)["messages"][0]["content"] for x in lines}
            assert len(prompts) == 64, cap


def test_more_dev_rows_than_the_table_holds_is_refused(tmp_path):
    with pytest.raises(InputError) as e:
        demo_suite.build_demo_suite(tmp_path, train_sizes={"cities": 10}, n_test=10, n_ref=64)
    assert e.value.field == "data.demo_n_ref"


# --- the training budget -------------------------------------------------------------------


class _Tok:
    pad_token_id = 0


def _suite(lengths_by_domain):
    from ideal_jax.data.formatting import TokenizedExample
    from ideal_jax.data.suite import Suite

    tokenized = {}
    for name, lengths in lengths_by_domain.items():
        tokenized[name] = [
            TokenizedExample(
                example_id=f"{name}:{i}",
                domain=name,
                input_ids=np.arange(1, n + 1, dtype=np.int32),
                loss_mask=np.r_[np.zeros(n // 2, bool), np.ones(n - n // 2, bool)],
            )
            for i, n in enumerate(lengths)
        ]
    domains = {
        n: [Example(f"{n}:{i}", n, (("user", "p"),), "r") for i in range(len(v))]
        for n, v in lengths_by_domain.items()
    }
    return Suite(domains, {}, _Tok(), tokenized, [], {}, {})


def _train_cfg(**kw):
    import ml_collections

    return ml_collections.ConfigDict(
        dict(seed=0, batch_size=4, seq_len=32, epochs=3, **kw)
    ), ml_collections.ConfigDict(dict(batching="pack"))


def test_every_mixture_trains_the_budgets_steps_whatever_it_packs_into():
    from ideal_jax.data.suite import count_tokens, mixture_batches

    rng = np.random.default_rng(0)
    suite = _suite({"short": rng.integers(3, 8, 200).tolist(), "long": [30] * 60})
    ids = {n: [t.example_id for t in v] for n, v in suite.tokenized.items()}
    train_cfg, data_cfg = _train_cfg()
    d0 = mixture.build_mixture(ids, None, seed=0)
    _, d0_steps = mixture_batches(suite, d0, train_cfg, data_cfg, 0)
    # Shorter examples pack into fewer rows: all-short trains fewer steps per epoch on its own.
    short_heavy = baselines.mixture_from_weights(ids, [0.95, 0.05], d0.total, 0)
    long_heavy = baselines.mixture_from_weights(ids, [0.05, 0.95], d0.total, 0)
    own = {
        name: mixture_batches(suite, m, train_cfg, data_cfg, 0)[1]
        for name, m in (("short", short_heavy), ("long", long_heavy))
    }
    assert own["short"] < d0_steps < own["long"]
    for m in (d0, short_heavy, long_heavy):
        batches, steps = mixture_batches(suite, m, train_cfg, data_cfg, 0, d0_steps)
        assert steps == d0_steps
        for epoch in range(3):
            got = list(batches(epoch))
            assert len(got) == d0_steps
            assert all(b["tokens"].shape == (4, 32) for b in got)
        counted = count_tokens(batches, 3)
        assert counted["tokens"] > 0 and counted["loss_tokens"] < counted["tokens"]
    # D0 under its own budget is exactly its own epochs (the budget changes nothing for D0).
    own_batches, _ = mixture_batches(suite, d0, train_cfg, data_cfg, 0)
    budget_batches, _ = mixture_batches(suite, d0, train_cfg, data_cfg, 0, d0_steps)
    for a, b in zip(own_batches(1), budget_batches(1)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


@pytest.mark.parametrize(
    "field, value",
    [("data.upsample", "fresh"), ("train.budget", "tokens"), ("data.demo_pool_factor", 0)],
)
def test_bad_pool_and_budget_settings_are_refused_when_the_config_loads(field, value):
    from configs import common
    from ideal_jax.configlib.checks import validate_config

    cfg = common.base_config()
    section, leaf = field.split(".")
    cfg[section][leaf] = value
    with pytest.raises(InputError) as e:
        validate_config(cfg)
    assert e.value.field == field
