"""The command line end to end on the tiny config: artifacts, resume, bad input."""

import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from ideal_jax import main
from ideal_jax.utils.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes):
    cfg = tiny.get_config()
    cfg.progress = False
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ideal"))
    result = main.run(_config(), workdir)
    return workdir, result


def test_full_loop_writes_every_artifact(finished_run):
    workdir, result = finished_run
    for name in ("config.json", "summary.json", "summary.png", "final_mixture.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for k in (0, 1):
        for name in ("mixture.json", "eval.json", "timings.json", "train/metrics.jsonl"):
            assert os.path.exists(os.path.join(workdir, f"round_{k}", name)), (k, name)
    influence = json.load(open(os.path.join(workdir, "round_0", "influence.json")))
    assert influence["rows"][0] == "all" and len(influence["domains"]) == 5
    assert influence["operator"] == "ekfac" and influence["scaling"] == "paper"
    assert all(
        p.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for p in influence["layers"]
    )
    # The paper's step: the domain with the largest |α| moves by exactly m = 0.15.
    beta = result["rounds"][0]["beta"]
    assert max(abs(b) for b in beta.values()) == pytest.approx(0.15)
    # keep_total: every round trains on the same number of examples.
    totals = [sum(d["target"] for d in r["mixture"].values()) for r in result["rounds"]]
    assert len(set(totals)) == 1
    lines = open(os.path.join(workdir, "final_mixture.jsonl")).read().splitlines()
    assert len(lines) == totals[-1]
    assert json.loads(lines[0])["messages"][-1]["role"] == "assistant"


def test_rerun_resumes_without_redoing_stages(finished_run):
    workdir, _ = finished_run
    timings = json.load(open(os.path.join(workdir, "round_1", "timings.json")))
    influence = open(os.path.join(workdir, "round_0", "influence.json")).read()
    main.run(_config(), workdir)
    assert json.load(open(os.path.join(workdir, "round_1", "timings.json"))) == timings
    assert open(os.path.join(workdir, "round_0", "influence.json")).read() == influence


def test_workdir_of_another_config_is_refused_and_untouched(finished_run):
    workdir, _ = finished_run
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(InputError, match=r"different config.*train.learning_rate"):
        main.run(_config(**{"train.learning_rate": 0.5}), workdir)
    assert open(os.path.join(workdir, "config.json")).read() == before


def test_bad_data_exits_2_with_file_and_line(tmp_path):
    bad = tmp_path / "math.jsonl"
    bad.write_text(
        '{"domain": "math", "prompt": "1+1", "response": "2"}\n'
        '{"domain": "math", "prompt": "2+2", "respons": "4"}\n'
    )
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"prompt": "1+1", "response": "2", "capability": "math"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ideal_jax.main",
            "--config",
            "configs/tiny.py",
            "--workdir",
            str(tmp_path / "run"),
            "--config.data.demo=False",
            f"--config.data.source={bad}",
            f"--config.data.reference_source={ref}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "math.jsonl" in proc.stderr and "line 2" in proc.stderr


def test_packed_epochs_of_different_lengths_train(tmp_path):
    """Packing gives each epoch its own row count; training must not trip over the shortest."""
    from ideal_jax import stages
    from ideal_jax.data import batching, mixture

    cfg = _config(**{"train.epochs": 6, "train.batch_size": 8})
    suite = stages.load_suite(cfg, str(tmp_path))
    ids = {n: [t.example_id for t in items] for n, items in suite.tokenized.items()}
    mix = mixture.build_mixture(ids, None, seed=0)
    batches_for_epoch, steps = stages.mixture_batches(suite, mix, cfg.train, cfg.data, 0)
    items = mixture.materialize(mix, suite.tokenized)
    counts = [batching.steps_per_epoch(items, 8, cfg.train.seq_len, "pack", 0, e) for e in range(6)]
    assert steps == min(counts)
    assert all(sum(1 for _ in batches_for_epoch(e)) >= steps for e in range(6))
