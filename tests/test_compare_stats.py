"""Paired statistics and the baselines' mixtures against exact answers (ideal_jax/compare)."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ideal_jax import stats
from ideal_jax.compare import baselines
from ideal_jax.utils.errors import InputError


@pytest.mark.parametrize("df", [1, 2, 4, 9, 29, 30, 31, 45, 200])
def test_t_quantile_matches_scipy(df):
    assert stats.t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=2e-3)


def test_mean_ci_is_the_student_t_interval():
    x = [0.31, 0.27, 0.35, 0.22, 0.30]
    out = stats.mean_ci(x)
    sem = scipy_stats.sem(x)
    lo, hi = scipy_stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=sem)
    assert out["mean"] == pytest.approx(np.mean(x))
    assert out["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-3)
    assert out["n"] == 5 and out["std"] == pytest.approx(np.std(x, ddof=1))
    one = stats.mean_ci([0.4])
    assert one["ci95"] is None and one["mean"] == 0.4


def test_paired_differences_remove_the_shared_seed_effect():
    # Seeds differ a lot (0.1 .. 0.5) but the method is better by 0.02 ± 0.005 on every seed:
    # the paired interval is narrow and excludes 0, the unpaired intervals overlap.
    base = [0.10, 0.30, 0.50, 0.20, 0.40]
    method = [b + d for b, d in zip(base, [0.02, 0.025, 0.015, 0.02, 0.02])]
    out = stats.paired(method, base)
    assert out["mean"] == pytest.approx(0.02)
    assert out["significant"] is True
    assert out["ci95"] < 0.01
    unpaired = stats.mean_ci(method)["ci95"] + stats.mean_ci(base)["ci95"]
    assert unpaired > 0.2  # the seeds' spread would hide the effect without pairing
    noise = stats.paired([0.31, 0.29, 0.33], [0.30, 0.31, 0.30])
    assert noise["significant"] is False
    assert stats.paired([0.5], [0.4])["significant"] is False  # one seed: never significant


def test_summarise_methods_pairs_each_metric_with_d0():
    scores = {
        "d0": [{"a": 0.1, "average": 0.1}, {"a": 0.3, "average": 0.3}],
        "x": [{"a": 0.2, "average": 0.2}, {"a": 0.5, "average": 0.5}],
    }
    out = stats.summarise_methods(scores)
    assert out["x"]["a"]["vs_d0"]["per_seed"] == pytest.approx([0.1, 0.2])
    assert out["d0"]["average"]["vs_d0"]["mean"] == 0.0
    r = stats.regret(out)
    assert r["best_method"] == "x" and r["gap"] == pytest.approx(0.15)
    assert r["share_closed"]["x"] == pytest.approx(1.0)
    assert r["share_closed"]["d0"] == pytest.approx(0.0)


def test_mixture_from_weights_has_the_proportions_and_d0s_total():
    ids = {"a": [f"a{i}" for i in range(100)], "b": [f"b{i}" for i in range(300)]}
    mix = baselines.mixture_from_weights(ids, [0.75, 0.25], 400, seed=0)
    assert mix.target_sizes == (300, 100) and mix.total == 400
    assert len(mix.example_ids[0]) == 300  # domain a repeated 3x
    assert set(mix.example_ids[0]) == set(ids["a"])
    uniform = baselines.mixture_from_weights(ids, baselines.uniform_weights(2), 400, seed=0)
    assert uniform.target_sizes == (200, 200)
    with pytest.raises(InputError, match="weights"):
        baselines.mixture_from_weights(ids, [1.0, -0.1], 400, seed=0)


def test_regmix_recovers_a_linear_law_and_proposes_towards_its_minimum():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(4), size=12)
    coef = np.array([1.0, 0.5, 2.0, 1.5])
    fit = baselines.fit_regmix(w, w @ coef)
    pred = baselines.predict_regmix(fit, w)
    assert np.allclose(pred, w @ coef, atol=2e-3)
    # Differences of coefficients are what the simplex identifies.
    got = np.asarray(fit["coef"])
    assert np.allclose(got - got.mean(), coef - coef.mean(), atol=5e-3)
    proposal = baselines.propose_regmix(
        fit, 4, seed=1, concentration=1.0, candidates=20000, top=100
    )
    assert proposal.sum() == pytest.approx(1.0)
    assert int(np.argmax(proposal)) == 1  # the domain with the smallest loss coefficient
    assert proposal @ coef < np.full(4, 0.25) @ coef  # better than uniform under the law
    with pytest.raises(InputError, match="compare.k"):
        baselines.fit_regmix(w[:1], (w @ coef)[:1])


def test_dirichlet_draws_are_deterministic_in_the_seed():
    a = baselines.dirichlet_weights(5, 3, seed=7, concentration=1.0)
    b = baselines.dirichlet_weights(5, 3, seed=7, concentration=1.0)
    c = baselines.dirichlet_weights(5, 3, seed=8, concentration=1.0)
    assert a.shape == (5, 3) and np.allclose(a.sum(1), 1.0)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_seed_aggregation_pairs_each_round_with_the_same_seeds_d0():
    from ideal_jax import summary

    results = [
        {"scores": [{"a": 0.1, "average": 0.1}, {"a": 0.15, "average": 0.15}]},
        {"scores": [{"a": 0.5, "average": 0.5}, {"a": 0.56, "average": 0.56}]},
        {"scores": [{"a": 0.3, "average": 0.3}, {"a": 0.34, "average": 0.34}]},
    ]
    agg = summary.aggregate_seeds(results)
    d = agg["scores"][1]["a"]["vs_d0"]
    assert d["per_seed"] == pytest.approx([0.05, 0.06, 0.04])
    assert d["mean"] == pytest.approx(0.05) and d["significant"] is True
    assert agg["scores"][1]["a"]["ci95"] > 0.3  # the seeds' spread, unpaired
    table = summary.format_table(agg["scores"])
    assert "D1-D0" in table and "+0.050 ± 0.025 *" in table


def test_a_single_seed_table_says_it_cannot_separate_effect_from_noise():
    from ideal_jax import summary

    table = summary.format_table([{"a": 0.2, "average": 0.2}, {"a": 0.4, "average": 0.4}])
    assert "cannot be separated from training noise" in table and "seeds=5" in table
