"""The loop as a state machine (ideal_jax/round.py, ideal.py): the round state carries the mixture,
the parameters' round and the reweight rule's optimizer state from one round to the next, is
saved as round_K/state.json, and resume wraps the rounds (finished rounds are not run again; an
interrupted one continues). Training, evaluation and the influence stage are stubbed with
deterministic functions of the mixture, so every test is fast and the loop's logic is all that
runs."""

import json
import os

import numpy as np
import pytest
from config_helpers import tiny_config

from ideal_jax import ideal
from ideal_jax import round as round_lib
from ideal_jax.influence.alpha import InfluenceResult
from ideal_jax.influence.result import GroupInfluence, RoundInfluence
from ideal_jax.utils.errors import InputError

WEIGHTS = np.array([1.0, -2.0, 0.5, 3.0, -1.0])


def _config(**changes):
    return tiny_config(**{"reweight.rule": "optax", "reweight.optimizer": "adam", **changes})


@pytest.fixture
def stubs(monkeypatch):
    """Training: params unchanged; eval: a loss that depends on the volumes; influence: α that
    depends on the volumes (so every round's step differs). Records every call."""
    calls = {"train": [], "influence": []}

    def fake_train_and_evaluate(run, rdir, timer, init_params, mix, *, train=True):
        calls["train"].append(os.path.basename(rdir))
        sizes = np.asarray(mix.target_sizes, float)
        loss = float(np.dot(sizes / sizes.sum(), WEIGHTS))
        return init_params, {"reference_loss": {"arithmetic": loss, "all": loss}}

    def fake_influence(run, params, mix, with_outer):
        calls["influence"].append(tuple(mix.target_sizes))
        sizes = np.asarray(mix.target_sizes, float)
        alpha = WEIGHTS + 0.01 * sizes
        result = InfluenceResult(
            matrix=alpha[None, :],
            rows=("all",),
            domains=tuple(mix.domain_names),
            operator="identity",
            damping={},
            layers=("x",),
            scaling="paper",
            sigma=None,
            domain_sizes=tuple(sizes),
            stderr=np.full((1, len(sizes)), 0.1),
        )
        return RoundInfluence(
            alpha=result,
            groups=(GroupInfluence(alpha=result),),
            estimator="fisher",
            relative_damping=False,
            correction=None,
            subsample={},
            subsample_examples=0,
            seq_len=1,
            timings={},
        )

    monkeypatch.setattr(round_lib, "train_and_evaluate", fake_train_and_evaluate)
    monkeypatch.setattr(round_lib, "_influence_stage", fake_influence)
    return calls


def _read(workdir, k, name):
    with open(os.path.join(workdir, f"round_{k}", name)) as f:
        return json.load(f)


def test_optimizer_state_flows_through_the_round_state(tmp_path, stubs):
    workdir = str(tmp_path / "w")
    ideal.run_ideal(_config(rounds=2), workdir)
    steps = [_read(workdir, k, "reweight.json") for k in (0, 1)]
    states = [_read(workdir, k, "state.json") for k in (0, 1, 2)]
    assert states[0]["optimizer_state"] is None and states[0]["params_round"] is None
    # round 1 starts from the state round 0's step left, and continues it (Adam's count 2)
    assert states[1]["optimizer_state"] == steps[0]["optimizer_state"]
    assert steps[0]["optimizer_state"]["leaves"][0] == 1
    assert steps[1]["optimizer_state"]["leaves"][0] == 2
    assert states[2]["optimizer_state"] == steps[1]["optimizer_state"]
    # the state's volumes are the mixture the round trains on
    for k in (0, 1, 2):
        volumes = {
            d: v["target_size"] for d, v in _read(workdir, k, "mixture.json")["domains"].items()
        }
        assert volumes == states[k]["volumes"]


def test_resume_skips_finished_rounds_and_continues_the_state(tmp_path, stubs):
    """rounds=1, then rounds=2 on the same workdir: round 0 is not run again; round 1 (finished
    without a step) takes its step from the saved optimizer state; the result equals an
    uninterrupted rounds=2 run."""
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    ideal.run_ideal(_config(rounds=2), whole)
    stubs["train"].clear()
    ideal.run_ideal(_config(rounds=1), resumed)
    assert stubs["train"] == ["round_0", "round_1"]
    stubs["train"].clear()
    ideal.run_ideal(_config(rounds=2), resumed)
    assert stubs["train"] == ["round_1", "round_2"]  # round 0 skipped, round 1 stepped now
    for k in (0, 1):
        assert _read(resumed, k, "reweight.json") == _read(whole, k, "reweight.json")
    assert _read(resumed, 2, "state.json") == _read(whole, 2, "state.json")
    stubs["train"].clear()
    ideal.run_ideal(_config(rounds=2), resumed)  # finished: nothing runs again
    assert stubs["train"] == []


def test_a_round_interrupted_after_its_step_resumes_from_the_saved_state(
    tmp_path, stubs, monkeypatch
):
    """A crash after round 0's step but before round 1 ran: the rerun reads round 0's outcome
    back (no retraining) and round 1 continues the optimizer state."""
    workdir = str(tmp_path / "w")
    whole = str(tmp_path / "whole")
    ideal.run_ideal(_config(rounds=2), whole)
    original = round_lib.run_round

    def crash_in_round_1(run, state, **kw):
        if state.k == 1:
            raise KeyboardInterrupt
        return original(run, state, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(ideal, "run_round", crash_in_round_1)
        with pytest.raises(KeyboardInterrupt):
            ideal.run_ideal(_config(rounds=2), workdir)
    assert os.path.exists(os.path.join(workdir, "round_1", "state.json"))
    stubs["train"].clear()
    ideal.run_ideal(_config(rounds=2), workdir)
    assert stubs["train"] == ["round_1", "round_2"]
    assert _read(workdir, 1, "reweight.json") == _read(whole, 1, "reweight.json")


def test_a_saved_optimizer_state_for_other_domains_is_refused(tmp_path, stubs):
    workdir = str(tmp_path / "w")
    ideal.run_ideal(_config(rounds=1), workdir)
    path = os.path.join(workdir, "round_1", "state.json")
    with open(path) as f:
        state = json.load(f)
    state["optimizer_state"]["leaves"][1] = [0.0, 0.0]  # Adam's first moment for 2 domains
    state["optimizer_state"]["position"] = [0.0, 0.0]
    with open(path, "w") as f:
        json.dump(state, f)
    os.remove(os.path.join(workdir, "round_1", "row.json"))  # make round 1 run again
    before = _contents(workdir)
    with pytest.raises(InputError, match="optimizer_state") as err:
        ideal.run_ideal(_config(rounds=2), workdir)
    assert "2 domains, the mixture has 5" in str(err.value)
    after = _contents(workdir)
    assert {p: after.get(p) for p in before} == before  # nothing written is lost or changed
    assert not os.path.exists(os.path.join(workdir, "round_2"))


def _contents(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            if name not in ("timings.json", "provenance.json"):
                with open(os.path.join(root, name), "rb") as f:
                    data = f.read()
                out[os.path.join(root, name)] = json.loads(data) if name.endswith(".json") else data
    return out
