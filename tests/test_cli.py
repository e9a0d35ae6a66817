"""The command line end to end on the tiny config: artifacts, resume, bad input."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from config_helpers import tiny_config

from ideal_jax import main
from ideal_jax.data import suite as suite_lib
from ideal_jax.utils.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**changes):
    return tiny_config(**changes)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Two rounds (D0 → D1 → D2), so the step from a resampled mixture is exercised too."""
    workdir = str(tmp_path_factory.mktemp("ideal"))
    result = main.run(_config(rounds=2), workdir)
    return workdir, result


def test_full_loop_writes_every_artifact(finished_run):
    workdir, result = finished_run
    assert set(result["rounds"][0]["alpha_stderr"]) == set(result["rounds"][0]["alpha"])
    assert "indistinguishable" in result["rounds"][0]
    stats = json.load(open(os.path.join(workdir, "data_stats.json")))
    assert stats["domains"]["sort"]["read"] == 60 and "dropped" in stats["domains"]["sort"]
    for name in ("config.json", "summary.json", "summary.png", "final_mixture.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for k in (0, 1, 2):
        for name in ("mixture.json", "eval.json", "timings.json", "train/metrics.jsonl"):
            assert os.path.exists(os.path.join(workdir, f"round_{k}", name)), (k, name)
    influence = json.load(open(os.path.join(workdir, "round_0", "influence.json")))
    assert influence["rows"][0] == "all" and len(influence["domains"]) == 5
    assert influence["operator"] == "ekfac" and influence["scaling"] == "paper"
    assert all(
        p.split(".")[-1] in ("gate_proj", "up_proj", "down_proj") for p in influence["layers"]
    )
    # keep_total: every round trains on the same number of examples.
    totals = [sum(d["target"] for d in r["mixture"].values()) for r in result["rounds"]]
    assert len(set(totals)) == 1
    lines = open(os.path.join(workdir, "final_mixture.jsonl")).read().splitlines()
    assert len(lines) == totals[-1]
    assert json.loads(lines[0])["messages"][-1]["role"] == "assistant"


def _read(workdir, k, name):
    return json.load(open(os.path.join(workdir, f"round_{k}", name)))


@pytest.mark.parametrize("k", [0, 1])
def test_each_step_is_applied_as_computed_and_recorded_as_applied(finished_run, k):
    """Issue 11: the realised step reaches m, follows −(projected α), and is what is recorded."""
    workdir, result = finished_run
    step, before, after = (
        _read(workdir, k, "reweight.json"),
        _read(workdir, k, "mixture.json"),
        _read(workdir, k + 1, "mixture.json"),
    )
    m = 0.15
    domains = list(before["domains"])
    n = {d: before["domains"][d]["target_size"] for d in domains}
    n2 = {d: after["domains"][d]["target_size"] for d in domains}
    applied = {d: n2[d] / n[d] - 1 for d in domains}
    assert sum(n2.values()) == sum(n.values())  # keep_total
    # The largest realised |β| is m, to one example.
    top = max(domains, key=lambda d: abs(step["direction"][d]))
    assert abs(abs(applied[top]) - m) <= 1 / n[top] + 1e-12
    assert max(abs(b) for b in applied.values()) <= m + 1 / min(n.values())
    # Every volume moves with the sign of d = −(α − size-weighted mean α), where it moves at all.
    alpha = step["alpha"]
    mean = sum(n[d] * alpha[d] for d in domains) / sum(n.values())
    for d in domains:
        d_j = -(alpha[d] - mean)
        assert d_j == pytest.approx(step["direction"][d], rel=1e-9, abs=1e-12)
        if abs(step["beta_nominal"][d]) * n[d] >= 1:
            assert (applied[d] > 0) == (d_j > 0), (d, applied[d], d_j)
    # Recorded as applied, everywhere a user reads β for this step.
    for d in domains:
        assert step["beta_applied"][d] == pytest.approx(applied[d], abs=1e-12)
        assert result["rounds"][k]["beta"][d] == pytest.approx(applied[d], abs=1e-12)
        assert after["domains"][d]["step_beta"] == pytest.approx(applied[d], abs=1e-12)
        source = after["domains"][d]["source_size"]
        assert after["domains"][d]["beta"] == pytest.approx(n2[d] / source - 1, abs=1e-12)
    # D_k+1 = (1 + β)·D_k: entries of D_k dropped or duplicated, never redrawn from the source.
    for d in domains:
        old, new = Counter(before["example_ids"][d]), Counter(after["example_ids"][d])
        if n2[d] <= n[d]:
            assert not new - old, d
        else:
            assert not old - new and set(new) <= set(old), d


def test_rerun_resumes_without_redoing_stages(finished_run):
    workdir, _ = finished_run
    timings = json.load(open(os.path.join(workdir, "round_1", "timings.json")))
    influence = open(os.path.join(workdir, "round_0", "influence.json")).read()
    main.run(_config(rounds=2), workdir)  # the same config (fewer rounds is refused)
    assert json.load(open(os.path.join(workdir, "round_1", "timings.json"))) == timings
    assert open(os.path.join(workdir, "round_0", "influence.json")).read() == influence


def test_workdir_of_another_config_is_refused_and_untouched(finished_run):
    workdir, _ = finished_run
    before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(InputError, match=r"different config.*train.learning_rate"):
        main.run(_config(**{"train.learning_rate": 0.5, "rounds": 2}), workdir)
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

    from ideal_jax.data import batching, mixture

    cfg = _config(**{"train.epochs": 6, "train.batch_size": 8})
    suite = suite_lib.load_suite(cfg, str(tmp_path))
    ids = {n: [t.example_id for t in items] for n, items in suite.tokenized.items()}
    mix = mixture.build_mixture(ids, None, seed=0)
    batches_for_epoch, steps = suite_lib.mixture_batches(suite, mix, cfg.train, cfg.data, 0)
    items = mixture.materialize(mix, suite.tokenized)
    counts = [batching.steps_per_epoch(items, 8, cfg.train.seq_len, "pack", 0, e) for e in range(6)]
    assert steps == min(counts)
    assert all(sum(1 for _ in batches_for_epoch(e)) >= steps for e in range(6))


def _cli(*args, cwd=ROOT, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ideal_jax.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_clean_exit_2(proc, workdir, *expected):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not os.path.exists(workdir)


BAD_CONFIGS = {
    # unknown field: named, with the section's fields
    "unknown_field": (["--config.train.lr=0.1"], ["'train.lr'", "train.* fields", "learning_rate"]),
    "unknown_section": (["--config.trian.epochs=1"], ["'trian.epochs'", "top-level fields"]),
    # ill-typed value: the field and the type it needs
    "bad_float": (["--config.train.learning_rate=abc"], ["'train.learning_rate'", "float"]),
    "bad_int": (["--config.train.epochs=1.5"], ["'train.epochs'", "int"]),
    # enumerated fields and obvious ranges, checked before the workdir exists
    "mode": (["--config.mode=train"], ["'mode'", "ideal, sft, influence, eval, daar"]),
    "rule": (["--config.reweight.rule=bogus"], ["'reweight.rule'", "paper, optax"]),
    "estimator": (["--config.curvature.estimator=sampled"], ["'curvature.estimator'", "fisher"]),
    "scaling": (["--config.influence.scaling=wrong"], ["'influence.scaling'", "paper, exact"]),
    "optimizer": (["--config.reweight.optimizer=adamx"], ["'reweight.optimizer'", "optax"]),
    "sigma": (["--config.curvature.sigma=1.5"], ["'curvature.sigma'", "(0, 1]"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_flag_exits_2_in_one_line(tmp_path, case):
    flags, expected = BAD_CONFIGS[case]
    workdir = str(tmp_path / "run")
    proc = _cli("--config", "configs/tiny.py", "--workdir", workdir, *flags)
    _assert_clean_exit_2(proc, workdir, *expected)


@pytest.mark.parametrize(
    "arg, expected",
    [
        ("bogus=1", ["'bogus'", "unknown field", "train"]),
        ("train.epochs=x", ["'train.epochs'", "int"]),
        ("seeds", ["'seeds'", "key=value"]),
    ],
)
def test_bad_config_argument_exits_2_in_one_line(tmp_path, arg, expected):
    workdir = str(tmp_path / "run")
    proc = _cli("--config", f"configs/tiny.py:{arg}", "--workdir", workdir)
    _assert_clean_exit_2(proc, workdir, *expected)


def test_missing_config_file_exits_2(tmp_path):
    workdir = str(tmp_path / "run")
    proc = _cli("--config", "configs/nope.py", "--workdir", workdir)
    _assert_clean_exit_2(proc, workdir, "configs/nope.py")


def test_library_run_validates_before_writing(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(InputError, match=r"'influence.operator'.*identity, kfac, ekfac"):
        main.run(_config(**{"influence.operator": "lissa"}), workdir)
    assert not os.path.exists(workdir)


def test_config_path_resolves_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_py = os.path.join(ROOT, "configs", "tiny.py")
    assert os.path.samefile(main.resolve_config_path("configs/tiny.py"), tiny_py)
    path, _, arg = main.resolve_config_path("configs/tiny.py:rounds=2").partition(":")
    assert os.path.samefile(path, tiny_py) and arg == "rounds=2"
    assert main.resolve_config_path("configs/nope.py") == "configs/nope.py"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text("")
    assert main.resolve_config_path("configs/tiny.py") == "configs/tiny.py"  # cwd's file wins


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_cli_runs_outside_the_repository(tmp_path, where):
    """From another directory the config loads (with its :ARG) and the run starts: it reaches the
    workdir check, which refuses a workdir made by another config."""
    config = "configs/tiny.py" if where == "relative" else os.path.join(ROOT, "configs/tiny.py")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"mode": "sft"}')
    proc = _cli("--config", f"{config}:rounds=3", "--workdir", str(workdir), cwd=str(cwd))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "different config" in proc.stderr, proc.stderr
    assert (workdir / "config.json").read_text() == '{"mode": "sft"}'
    assert os.listdir(workdir) == ["config.json"]


def _copy_run(finished_run, tmp_path):
    workdir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(".lock"))
    return str(copy)


def test_hand_edited_artifact_is_not_trusted(finished_run, tmp_path):
    """influence.json with α negated (valid JSON): refused, named, and left as it is."""
    workdir = _copy_run(finished_run, tmp_path)
    path = os.path.join(workdir, "round_1", "influence.json")
    influence = json.load(open(path))
    influence["matrix"] = [[-x for x in row] for row in influence["matrix"]]
    json.dump(influence, open(path, "w"))
    edited = open(path).read()
    with pytest.raises(InputError, match=r"influence.json was modified after it was written"):
        main.run(_config(rounds=2), workdir)
    assert open(path).read() == edited


def test_deleting_config_json_does_not_let_another_config_reuse_artifacts(finished_run, tmp_path):
    workdir = _copy_run(finished_run, tmp_path)
    os.remove(os.path.join(workdir, "config.json"))
    # the first artifact that depends on training names the section that changed
    with pytest.raises(InputError, match=r"was produced from other inputs: config\.train changed"):
        main.run(_config(rounds=2, **{"train.learning_rate": 0.5}), workdir)


def test_edited_training_data_is_detected(finished_run, tmp_path):
    """Same record count, one response changed in place: the data fingerprint differs."""
    workdir = _copy_run(finished_run, tmp_path)
    path = os.path.join(workdir, "demo_data", "train", "sort.jsonl")
    lines = open(path).read().splitlines()
    record = json.loads(lines[0])
    key = "response" if "response" in record else "output"
    if key in record:
        record[key] = record[key] + " x"
    else:
        record["messages"][-1]["content"] += " x"
    lines[0] = json.dumps(record)
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"produced from other inputs: data"):
        main.run(_config(rounds=2), workdir)
