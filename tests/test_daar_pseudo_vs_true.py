"""benchmarks/daar_pseudo_vs_true.py: purity by hand, and a tiny run of both arms.

The tiny run (a 2.5% copy-task pool, one seed, two rounds; SFT and α stood in for, see STAND_IN)
checks what the comparison rests on: the JSON keys, equal training examples per round in both
arms (D0: the same examples, so equal tokens too), and that the pseudo arm's domains are DaaR's
ψ_dom labels of the pool (its scores.npz), not the hidden true labels.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from config_helpers import load_benchmark

from ideal_jax.daar import store
from ideal_jax.daar.config import DaarConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "daar_pseudo_vs_true.py")


def _bench():
    return load_benchmark("daar_pseudo_vs_true")


def test_agreement_purity_and_confusion_by_hand():
    bench = _bench()
    true = {
        "a1": "arithmetic",
        "a2": "arithmetic",
        "w1": "arithmetic_wrong",
        "w2": "arithmetic_wrong",
        "w3": "arithmetic_wrong",
        "r1": "reverse",
        "r2": "reverse",
        "u1": "uppercase",
    }
    pseudo = {
        "a1": "arithmetic",
        "a2": "arithmetic",
        "w1": "arithmetic",
        "w2": "arithmetic",
        "w3": "reverse",
        "r1": "reverse",
        "r2": "uppercase",
        "u1": "uppercase",
    }
    got = bench.agreement(true, pseudo)
    # Cluster majorities: arithmetic → arithmetic_wrong 2 (of 4), reverse → 1 (of 2),
    # uppercase → 1 (of 2): (2 + 1 + 1) / 8. Merged: arithmetic 4, reverse 1, uppercase 1.
    assert got["purity"] == pytest.approx(4 / 8)
    assert got["purity_merged"] == pytest.approx(6 / 8)
    assert got["confusion"]["arithmetic"] == {
        "arithmetic": 2,
        "arithmetic_wrong": 2,
        "reverse": 0,
        "uppercase": 0,
    }
    assert got["confusion"]["reverse"]["arithmetic_wrong"] == 1
    assert got["confusion"]["uppercase"] == {
        "arithmetic": 0,
        "arithmetic_wrong": 0,
        "reverse": 1,
        "uppercase": 1,
    }
    assert got["n"] == 8
    with pytest.raises(ValueError):
        bench.agreement(true, {**pseudo, "x": "sort"})


# The benchmark in a subprocess with one CPU device (conftest's 8 fake devices wait on each
# other's collectives, which time out on a loaded 2-core machine). Everything is real (configs,
# load_run, DaaR, labels, volumes, aggregation) but SFT and α: run_ideal is replaced by rounds of
# the real keep-total reweight step (reweight.compute_step, mixture.resample_from) from a fixed α,
# so the test stays in seconds; the training loop has tests of its own.
STAND_IN = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import daar_pseudo_vs_true as bench
from ideal_jax import reweight, round as round_lib

def run_ideal(cfg, workdir, *, loaded):
    state = round_lib.initial_state(loaded)
    for k in range(cfg.rounds):
        round_lib.save_state(loaded, state)
        n = len(state.mixture.domain_names)
        alpha = np.linspace(-1.0, 1.0, n)
        step = reweight.compute_step(alpha, state.mixture.target_sizes, loaded.reweight_cfg)
        mix = round_lib.mixture_lib.resample_from(state.mixture, step.volumes_after, seed=k)
        state = round_lib.RoundState(k=k + 1, mixture=mix)
    round_lib.save_state(loaded, state)
    caps = list(loaded.suite.reference)
    score = lambda k: {**{c: 0.1 * k for c in caps}, "average": 0.1 * k}
    loss = lambda k: {**{c: 1.0 - 0.1 * k for c in caps}, "all": 1.0}
    rows = range(cfg.rounds + 1)
    return {"scores": [score(k) for k in rows], "reference_loss": [loss(k) for k in rows],
            "rounds": [{} for _ in rows]}

bench.ideal.run_ideal = run_ideal
bench.main(json.loads(sys.argv[2]))
"""


def test_tiny_run_pseudo_arm_trains_on_daar_labels(tmp_path):
    bench = _bench()
    workdir = str(tmp_path / "bench")
    overrides = "daar.probe_epochs=1,daar.probe_cross_fit_folds=0,daar.target_per_domain=3"
    sizes = dict(scale=0.025, epochs=1, rounds=2, n_test=2, n_ref=8, override=overrides)
    argv = ["--seeds", "1", "--workdir", workdir]
    for key, value in sizes.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-c", STAND_IN, os.path.dirname(BENCH), json.dumps(argv)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("purity", "true", "pseudo", "pseudo_minus_true", "tokens_per_round"):
        assert key in last
    for arm in ("true", "pseudo"):
        assert {"mean", "ci95", "reference_loss", "d0"} <= set(last[arm])
        assert last[arm]["mean"] == pytest.approx(0.2)  # the stand-in's final-round score
    assert {"mean", "ci95", "significant", "reference_loss", "d0"} <= set(last["pseudo_minus_true"])
    assert 0.0 < last["purity"]["mean"] <= 1.0
    assert last["pseudo_minus_true"]["mean"] == pytest.approx(0.0)
    assert last["pseudo_minus_true"]["ci95"] is None  # one seed: no interval
    assert os.path.exists(os.path.join(workdir, "pseudo_vs_true.png"))

    # The pseudo arm's domains are DaaR's: ψ_dom's argmax per pool example (scores.npz).
    sdir = os.path.join(workdir, "seed_0")
    with open(os.path.join(sdir, "labels.json")) as f:
        labels = json.load(f)
    cfg = bench.make_config(bench.argparse.Namespace(**sizes), 0, "pseudo")
    names = DaarConfig.from_section(cfg.daar).domain_names
    labels_n = store.load_npz(os.path.join(sdir, "pseudo", "daar", "scores.npz"))["labels_n"]
    assert labels["pseudo"] == [names[int(k)] for k in labels_n]
    assert labels["pseudo"] != labels["true"]  # arithmetic_wrong is no pseudo-domain
    assert "arithmetic_wrong" in labels["true"] and "arithmetic_wrong" not in labels["pseudo"]
    with open(os.path.join(sdir, "result.json")) as f:
        seed = json.load(f)
    assert sorted(seed["arms"]["pseudo"]["domains"]) == sorted(set(labels["pseudo"]))
    assert "arithmetic_wrong" in seed["arms"]["true"]["domains"]
    counts = np.unique(labels["pseudo"], return_counts=True)
    for name, n in zip(*counts):
        assert seed["arms"]["pseudo"]["volumes"][0]["volumes"][name] == n

    # Equal training examples per round; D0 is the same pool in both arms: equal tokens too.
    true_vol, pseudo_vol = (last["tokens_per_round"][arm] for arm in ("true", "pseudo"))
    assert len(true_vol) == len(pseudo_vol) == 3
    assert [v["examples"] for v in true_vol] == [v["examples"] for v in pseudo_vol]
    assert true_vol[0] == pseudo_vol[0]
