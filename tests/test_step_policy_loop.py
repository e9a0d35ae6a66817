"""The trust-region step policy through the real IDEAL loop (tiny config), with a scripted dev
objective: a rejected round's step restarts from the incumbent with a shorter step, rejected rounds
are counted, the result is the best accepted round, the recorded prediction is α·β as applied,
and a SIGKILL inside a rejected round resumes to the same final mixture."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

pytestmark = pytest.mark.integration

# The dev objective each round "measures": rounds 1 and 2 both worse than D0 (rejected). The
# result is D0 (round 0), not the last round.
SCRIPT = [1.0, 1.2, 1.1]
CHANGES = {
    "rounds": 2,
    "reweight.policy": "trust_region",
    "reweight.step_size": 0.2,
    "reweight.step_max": 0.6,
    "reweight.step_min": 0.05,
    "export.final_model": False,
}


def _scripted(kill_at: int | None = None):
    """step_policy.decide with SCRIPT[k] in place of the measured objective (SIGKILL at kill_at)."""
    from ideal_jax import step_policy

    real = step_policy.decide

    def decide(cfg, state, k, objective):
        if k == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(cfg, state, k, SCRIPT[k])

    step_policy.decide = decide
    return real


def _run(workdir, kill_at=None):
    from config_helpers import tiny_config

    from ideal_jax import main, step_policy

    real = _scripted(kill_at)
    try:
        return main.run(tiny_config(**CHANGES), workdir)
    finally:
        step_policy.decide = real


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trust"))
    _run(workdir)
    return workdir


def _json(*parts):
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def test_rejected_rounds_restart_from_the_incumbent_with_a_shorter_step(finished):
    summary = _json(finished, "summary.json")
    rows = summary["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]  # rejected rounds are trained and counted
    assert [r["policy"]["accepted"] for r in rows] == [True, False, False]
    assert [r["policy"]["incumbent"] for r in rows] == [0, 0, 0]
    assert rows[2]["policy"]["step_size"] == pytest.approx(0.05)  # rejected again: 0.1 halved
    assert summary["result_round"] == 0
    # Round 0's step: m = 0.2. Round 1 rejected: its step starts from D0 again, m = 0.1.
    assert rows[0]["next_step"] == pytest.approx(
        {
            "from_round": 0,
            "step_size": 0.2,
            "predicted_change": rows[0]["next_step"]["predicted_change"],
        }
    )
    assert rows[1]["next_step"]["from_round"] == 0
    assert rows[1]["next_step"]["step_size"] == pytest.approx(0.1)
    d0 = _json(finished, "round_0", "mixture.json")
    step1 = _json(finished, "round_1", "reweight.json")
    assert step1["volumes_before"] == {n: d["target_size"] for n, d in d0["domains"].items()}
    assert max(abs(b) for b in step1["beta_nominal"].values()) == pytest.approx(0.1)
    # D2 is D0 moved by that step: nested in D0 (a shrunk domain keeps only D0's examples, a grown
    # one keeps all of them), not in the rejected D1.
    d2 = _json(finished, "round_2", "mixture.json")
    for name, ids in d2["example_ids"].items():
        before, after = set(d0["example_ids"][name]), set(ids)
        assert after <= before or before <= after, name


def test_the_recorded_prediction_is_alpha_dot_the_applied_step(finished):
    rows = _json(finished, "summary.json")["rounds"]
    for k, base in ((0, 0), (1, 0)):
        alpha = _json(finished, f"round_{base}", "influence.json")
        step = _json(finished, f"round_{k}", "reweight.json")
        names = list(step["beta_applied"])
        a = np.array([step["alpha"][n] for n in names])
        b = np.array([step["beta_applied"][n] for n in names])
        assert rows[k]["next_step"]["predicted_change"] == pytest.approx(float(a @ b), rel=1e-9)
        assert step["alpha"] == pytest.approx(rows[k]["alpha"])
        assert alpha  # the base round's α file exists and fed the step
    # The round a step produced compares the prediction with the measured change.
    assert rows[1]["predicted_change"] == pytest.approx(rows[0]["next_step"]["predicted_change"])
    assert rows[1]["measured_change"] == pytest.approx(SCRIPT[1] - SCRIPT[0])
    assert rows[2]["measured_change"] == pytest.approx(SCRIPT[2] - SCRIPT[0])  # vs the incumbent


def test_the_final_mixture_is_the_best_accepted_round(finished):
    best = _json(finished, "round_0", "mixture.json")
    counts = {}
    with open(os.path.join(finished, "final_mixture.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            counts[rec["domain"]] = counts.get(rec["domain"], 0) + 1
    assert counts == {n: d["target_size"] for n, d in best["domains"].items() if d["target_size"]}


def test_sigkill_inside_a_rejected_round_resumes_to_the_same_result(finished, tmp_path):
    workdir = str(tmp_path / "killed")
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), workdir, "1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not os.path.exists(os.path.join(workdir, "round_1", "row.json"))
    _run(workdir)
    with open(os.path.join(finished, "final_mixture.jsonl")) as f:
        want = f.read()
    with open(os.path.join(workdir, "final_mixture.jsonl")) as f:
        assert f.read() == want
    assert _json(workdir, "summary.json")["result_round"] == 0


if __name__ == "__main__":  # the child of the SIGKILL test: run until killed in round KILL_AT
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    _run(sys.argv[1], kill_at=int(sys.argv[2]))
