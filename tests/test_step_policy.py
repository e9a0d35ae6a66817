"""The step policy (ideal_jax/step_policy.py) on scripted dev objectives: accept widens, reject
returns to the incumbent and shrinks, the floor stops, the best accepted round is the result."""

import pytest

from configs import common
from ideal_jax import stages, step_policy
from ideal_jax.utils.errors import InputError


def _cfg(**changes):
    values = dict(
        policy="trust_region",
        step_size=0.2,
        step_max=0.6,
        step_min=0.05,
        widen=2.0,
        shrink=0.5,
        accept_on="reference_loss",
    )
    values.update(changes)
    return step_policy.PolicyConfig(**values)


def _run(cfg, objectives):
    """The decisions for a known sequence of measured objectives, one per round."""
    state, out = step_policy.initial_state(cfg), []
    for k, value in enumerate(objectives):
        d = step_policy.decide(cfg, state, k, value)
        out.append(d)
        if d.stop:
            break
        state = d.next_state()
    return out


def test_accept_widens_reject_returns_to_the_incumbent_and_shrinks():
    # D0 = 1.0; D1 better (accept, widen 0.2 -> 0.4); D2 worse than D1 (reject, back to round 1,
    # 0.4 -> 0.2); D3 better than D1 (accept, 0.2 -> 0.4); D4 better (accept, 0.4 -> 0.6 = max).
    d = _run(_cfg(), [1.0, 0.8, 0.9, 0.7, 0.6])
    assert [x.accepted for x in d] == [True, True, False, True, True]
    assert [x.incumbent for x in d] == [0, 1, 1, 3, 4]
    assert [x.step_size for x in d] == pytest.approx([0.2, 0.4, 0.2, 0.4, 0.6])
    assert [x.incumbent_objective for x in d] == [1.0, 0.8, 0.8, 0.7, 0.6]
    assert not any(x.stop for x in d)


def test_an_equal_objective_is_no_improvement():
    d = _run(_cfg(), [1.0, 1.0])
    assert not d[1].accepted and d[1].incumbent == 0


def test_the_floor_stops_the_loop_and_the_best_accepted_round_is_the_result():
    # accept (0.4), three rejections (0.2, 0.1, 0.05 = the floor: not below it), accept (0.1).
    d = _run(_cfg(), [1.0, 0.9, 0.95, 0.93, 0.91, 0.5])
    assert [x.accepted for x in d] == [True, True, False, False, False, True]
    assert [x.step_size for x in d] == pytest.approx([0.2, 0.4, 0.2, 0.1, 0.05, 0.1])
    assert [x.incumbent for x in d] == [0, 1, 1, 1, 1, 5]
    # Only rejections: 0.2 -> 0.1 -> 0.05 -> 0.025 < floor: stop after round 3.
    d = _run(_cfg(), [1.0, 1.1, 1.2, 1.3])
    assert [x.step_size for x in d] == pytest.approx([0.2, 0.1, 0.05, 0.025])
    assert [x.stop for x in d] == [False, False, False, True]
    assert d[-1].incumbent == 0  # no step was ever accepted: D0 is the result


def test_the_next_state_starts_from_the_incumbent_and_carries_the_prediction():
    d = _run(_cfg(), [1.0, 1.2])[1]
    nxt = d.next_state(predicted_change=-0.03)
    assert (nxt.step_from, nxt.incumbent, nxt.step_size) == (0, 0, pytest.approx(0.1))
    assert nxt.predicted_change == -0.03
    again = step_policy.PolicyState.from_json(nxt.to_json())
    assert again == nxt


def test_fixed_is_the_paper_every_step_kept_at_m():
    d = _run(_cfg(policy="fixed"), [1.0, 2.0, 3.0, None])
    assert all(x.accepted for x in d) and [x.incumbent for x in d] == [0, 1, 2, 3]
    assert {x.step_size for x in d} == {0.2}


def test_a_missing_objective_is_refused_under_the_trust_region():
    with pytest.raises(InputError) as e:
        _run(_cfg(), [1.0, float("nan")])
    assert e.value.field == "reweight.accept_on"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"step_size": 3.0}, "reweight.step_max"),  # above the maximum
        ({"step_min": 0.7}, "reweight.step_min"),  # floor above the first step
        ({"step_min": 0.0}, "reweight.step_min"),
        ({"step_min": -0.1}, "reweight.step_min"),
        ({"accept_on": "dev_accuracy"}, "reweight.accept_on"),
        ({"policy": "line_search"}, "reweight.policy"),
        ({"shrink": 1.0}, "reweight.shrink"),
        ({"widen": 0.5}, "reweight.widen"),
    ],
)
def test_bad_policy_settings_name_the_field(changes, field):
    with pytest.raises(InputError) as e:
        _cfg(**changes)
    assert e.value.field == field
    cfg = common.base_config()
    cfg.reweight.policy = "trust_region"
    for key, value in changes.items():
        cfg.reweight[key] = value
    with pytest.raises(InputError) as e:  # the config is refused when it loads
        stages.load(cfg)
    assert e.value.field == field


def test_the_base_config_builds_a_policy():
    cfg = step_policy.PolicyConfig.from_config_dict(common.base_config().reweight)
    assert cfg.step_min <= cfg.step_size <= cfg.step_max


def test_the_dev_objective_is_the_reference_loss_or_minus_the_dev_score():
    from ideal_jax import round as round_lib

    cfg = common.base_config()
    scores = {
        "reference_loss": {"all": 9.0, "a": 1.0, "b": 2.0},
        "tasks": {"dev": {"per_capability": {"a": 0.5, "b": 0.75}}, "demo": {}},
    }
    assert round_lib.dev_objective(scores, cfg, "reference_loss") == pytest.approx(1.5)
    assert round_lib.dev_objective(scores, cfg, "dev_score") == pytest.approx(-0.625)
    assert round_lib.dev_objective({"tasks": {}}, cfg, "dev_score") is None


def test_the_dev_task_scores_the_reference_rows_and_is_not_a_test_score():
    from ideal_jax import summary
    from ideal_jax.data import suite as suite_lib
    from ideal_jax.data.records import Example

    reference = {
        "math": [Example("r1", "math", (("system", "be brief"), ("user", "2+2")), "4")],
        "code": [Example("r2", "code", (("user", "print 1"),), "1")],
    }
    task = suite_lib.dev_task(reference, common.base_config().eval)
    assert task["type"] == "exact_match"
    assert [(r["capability"], r["prompt"], r["response"]) for r in task["records"]] == [
        ("math", "2+2", "4"),
        ("code", "print 1", "1"),
    ]
    row = {"eval": {"tasks": {"dev": {"primary": 0.9}, "gsm8k": {"primary": 0.4}}}}
    assert summary.round_scores(row) == {"gsm8k": 0.4}
