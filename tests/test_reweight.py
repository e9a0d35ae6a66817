"""β from α: the keep-total step as a constraint, realised volumes, bounds, the optax rule; the
config (every field from cfg.reweight, no defaults of its own)."""

import dataclasses

import numpy as np
import pytest

from configs import common
from ideal_jax import reweight
from ideal_jax.utils.errors import InputError

# Measured on the demo, round 0 (issue 11): every α < 0, so the paper's β is positive everywhere.
DEMO_ALPHA = np.array([-7.19, -2.19, -10.34, -2.42, -16.84])
DEMO_SIZES = [400, 800, 2000, 1000, 1600]


def _cfg(**kw):
    """configs/common.py's cfg.reweight (the only defaults) with `kw` replaced."""
    return reweight.ReweightConfig.from_config_dict(common.base_config().reweight, **kw)


def _paper(**kw):
    return _cfg(**{"rule": "paper", "step_size": 0.15, **kw})


def test_defaults_live_in_cfg_reweight_only():
    """ReweightConfig has no defaults of its own; cfg.reweight sets every field."""
    fields = dataclasses.fields(reweight.ReweightConfig)
    assert all(f.default is dataclasses.MISSING for f in fields)
    section = common.base_config().reweight
    cfg = reweight.ReweightConfig.from_config_dict(section)
    assert {f.name: getattr(cfg, f.name) for f in fields} == {
        f.name: section[f.name] for f in fields
    }


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(reweight.ReweightConfig)])
def test_a_field_missing_from_the_config_is_named(name):
    section = common.base_config().reweight.to_dict()
    del section[name]
    with pytest.raises(InputError, match=f"no field '{name}'") as e:
        reweight.ReweightConfig.from_config_dict(section)
    assert e.value.field == f"reweight.{name}"


def test_every_field_is_set_from_the_config():
    """A non-default value of every cfg.reweight field reaches ReweightConfig."""
    changed = dict(
        rule="optax", step_size=0.3, beta_min=-0.5, beta_max=2.0, min_volume=3,
        optimizer="adam", learning_rate=0.05, keep_total=False, significance_z=1.5,
        hold_indistinguishable=True, outer_optimizer="adam", outer_learning_rate=0.01,
        outer_steps=7,
    )  # fmt: skip
    fields = {f.name for f in dataclasses.fields(reweight.ReweightConfig)}
    assert set(changed) == fields, "a ReweightConfig field this test does not set"
    section = common.base_config().reweight
    for key, value in changed.items():
        assert section[key] != value, key
        section[key] = value
    cfg = reweight.ReweightConfig.from_config_dict(section)
    assert {key: getattr(cfg, key) for key in changed} == changed


def test_keep_total_step_is_projected_and_reaches_m():
    step = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, _paper())
    sizes = np.asarray(DEMO_SIZES, float)
    mean = np.dot(sizes, DEMO_ALPHA) / sizes.sum()
    d = -(DEMO_ALPHA - mean)
    np.testing.assert_allclose(step.direction, d, rtol=1e-12)
    np.testing.assert_allclose(step.beta_nominal, 0.15 * d / np.abs(d).max(), rtol=1e-12)
    # The constraint holds before rounding, and the total exactly after it.
    assert abs(np.dot(sizes, step.beta_nominal)) < 1e-9 * sizes.sum()
    assert step.volumes_after.sum() == sizes.sum()
    # Realised: every volume within one example of (1 + β) n, largest |β| = m (±1 example).
    assert np.all(np.abs(step.volumes_after - (1 + step.beta_nominal) * sizes) < 1.0)
    applied = step.beta_applied
    j = np.argmax(np.abs(d))
    assert abs(abs(applied[j]) - 0.15) <= 1.0 / sizes[j]
    # Every domain moves in the direction of −(projected α); here all five move.
    assert np.all(np.sign(applied) == np.sign(d))
    # On the demo numbers (size-weighted mean α = −9.43): the signs issue 11 saw realised.
    assert list(np.sign(applied)) == [-1, -1, 1, -1, 1]


def test_old_rescale_after_the_paper_step_is_not_what_we_do():
    """The paper step then a keep-total rescale realises only ~40% of m and can flip signs."""
    sizes = np.asarray(DEMO_SIZES, float)
    paper_beta = -0.15 * DEMO_ALPHA / np.abs(DEMO_ALPHA).max()
    rescaled = (1 + paper_beta) * sizes * sizes.sum() / ((1 + paper_beta) * sizes).sum()
    old_applied = rescaled / sizes - 1
    assert np.abs(old_applied).max() < 0.07  # what issue 11 measured
    step = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, _paper())
    assert np.abs(step.beta_applied).max() > 0.149


def test_without_keep_total_the_paper_rule():
    step = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, _paper(keep_total=False))
    np.testing.assert_allclose(step.beta_nominal, -0.15 * DEMO_ALPHA / 16.84, rtol=1e-12)
    expected = np.floor((1 - 0.15 * DEMO_ALPHA / 16.84) * DEMO_SIZES + 1e-9)
    np.testing.assert_array_equal(step.volumes_after, expected)


def test_exact_scaling_alpha_summing_to_zero_keeps_direction():
    """With α Σ = 0 ("exact" scaling), the keep-total direction is −α shifted by a constant."""
    alpha = np.array([0.3, -0.1, -0.2])
    sizes = [100, 300, 600]
    step = reweight.compute_step(alpha, sizes, _paper())
    shift = step.direction + alpha
    np.testing.assert_allclose(shift, shift[0], atol=1e-12)  # a constant shift of −α
    assert abs(np.dot(sizes, step.direction)) < 1e-9


def test_equal_alpha_is_no_step():
    step = reweight.compute_step(np.full(3, -2.5), [10, 20, 30], _paper())
    np.testing.assert_array_equal(step.volumes_after, [10, 20, 30])
    np.testing.assert_array_equal(step.beta_applied, 0.0)


def test_bounds_keep_the_total():
    cfg = _paper(step_size=0.8, beta_min=-0.5, beta_max=0.2, min_volume=8)
    alpha = np.array([5.0, -5.0, 1.0, -1.0])
    sizes = np.array([100, 100, 10, 400])
    step = reweight.compute_step(alpha, sizes, cfg)
    beta = step.beta_nominal
    assert np.all(beta >= -0.5 - 1e-12) and np.all(beta <= 0.2 + 1e-12)
    assert np.all((1 + beta) * sizes >= 8 - 1e-9)
    assert abs(np.dot(sizes, beta)) < 1e-9 * sizes.sum()
    assert step.volumes_after.sum() == sizes.sum()


def test_non_finite_alpha_and_bad_rule_are_input_errors():
    with pytest.raises(InputError, match="non-finite"):
        reweight.compute_step(np.array([1.0, np.nan]), [1, 1], _paper())
    with pytest.raises(InputError, match="reweight.rule"):
        _cfg(rule="doremi")
    with pytest.raises(InputError, match="reweight.optimizer"):
        _cfg(rule="optax", optimizer="nope")


def test_optax_sgd_at_lr_m_is_the_paper_step():
    optax_cfg = _cfg(rule="optax", optimizer="sgd", learning_rate=0.15)
    a = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, optax_cfg)
    b = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, _paper())
    np.testing.assert_allclose(a.beta_nominal, b.beta_nominal, rtol=1e-5)


def test_optax_is_scale_free_and_bounded_by_m():
    cfg = _cfg(rule="optax", optimizer="sgd", learning_rate=1.0)
    small = reweight.compute_step(DEMO_ALPHA * 1e-6, DEMO_SIZES, cfg)
    large = reweight.compute_step(DEMO_ALPHA * 1e6, DEMO_SIZES, cfg)
    np.testing.assert_allclose(small.beta_nominal, large.beta_nominal, rtol=1e-5)
    np.testing.assert_allclose(np.abs(large.beta_nominal).max(), cfg.step_size, rtol=1e-6)


def test_optax_adam_first_step_moves_and_state_continues():
    cfg = _cfg(rule="optax", optimizer="adam", learning_rate=0.05)
    first = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, cfg)
    assert np.any(first.volumes_after != np.asarray(DEMO_SIZES))
    assert np.all(np.sign(first.beta_nominal) == np.sign(first.direction))
    # Continuing from the saved state differs from starting afresh (Adam's moments carry over),
    # and a JSON round trip of the state (what reweight.json holds) continues identically.
    sizes2 = first.volumes_after
    cont = reweight.compute_step(DEMO_ALPHA, sizes2, cfg, first.optimizer_state)
    fresh = reweight.compute_step(DEMO_ALPHA, sizes2, cfg, None)
    assert not np.allclose(cont.beta_nominal, fresh.beta_nominal)
    domains = [f"d{i}" for i in range(5)]
    restored = reweight.Step.from_json(first.to_json(domains), domains)
    again = reweight.compute_step(DEMO_ALPHA, sizes2, cfg, restored.optimizer_state)
    np.testing.assert_allclose(again.beta_nominal, cont.beta_nominal, rtol=1e-6)
    count = first.optimizer_state["leaves"][0]
    assert count == 1 and cont.optimizer_state["leaves"][0] == 2


def test_step_json_round_trip_records_applied_beta():
    step = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, _paper())
    domains = ["arithmetic", "lookup", "reverse", "sort", "uppercase"]
    obj = step.to_json(domains)
    for d, n, after in zip(domains, DEMO_SIZES, step.volumes_after):
        assert obj["beta_applied"][d] == pytest.approx(after / n - 1)
    back = reweight.Step.from_json(obj, domains)
    np.testing.assert_array_equal(back.volumes_after, step.volumes_after)
    np.testing.assert_allclose(back.beta_applied, step.beta_applied)


def test_outer_rule_needs_the_round_objective():
    with pytest.raises(InputError, match="outer objective"):
        reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, _cfg(rule="outer"))
    with pytest.raises(InputError, match="reweight.outer_optimizer"):
        _cfg(rule="outer", outer_optimizer="nope")


def test_indistinguishable_domains_are_reported_and_optionally_held():
    stderr = np.array([1.0, 5.0, 1.0, 1.0, 1.0])  # lookup: |α| = 2.19 < 2 × 5.0
    step = reweight.compute_step(DEMO_ALPHA, DEMO_SIZES, _paper(), stderr_j=stderr)
    assert list(step.indistinguishable(2.0)) == [False, True, False, False, False]
    assert step.beta_applied[1] != 0  # reported only, by default
    held = reweight.compute_step(
        DEMO_ALPHA, DEMO_SIZES, _paper(hold_indistinguishable=True), stderr_j=stderr
    )
    assert held.volumes_after[1] == DEMO_SIZES[1] and held.held == (
        False,
        True,
        False,
        False,
        False,
    )
    assert held.volumes_after.sum() == sum(DEMO_SIZES)  # the others carry the keep-total step
    np.testing.assert_allclose(np.abs(held.beta_nominal).max(), 0.15, rtol=1e-12)
    domains = [f"d{i}" for i in range(5)]
    back = reweight.Step.from_json(held.to_json(domains), domains)
    assert back.held == held.held and np.allclose(back.stderr, stderr)
