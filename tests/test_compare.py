"""mode=compare end to end on the tiny config: every method at equal volume, paired over seeds,
resumable, bad input refused before work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from config_helpers import tiny_config

from ideal_jax import main
from ideal_jax.utils.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = "ideal,uniform,random,regmix,doremi"


def _config(**changes):
    defaults = {"mode": "compare", "seeds": 2, "compare.k": 2, "compare.methods": METHODS}
    return tiny_config(**{**defaults, "export.final_model": False, **changes})


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("compare"))
    return workdir, main.run(_config(), workdir)


def test_every_method_is_trained_at_d0s_volume_and_paired(compared):
    workdir, result = compared
    on_disk = json.load(open(os.path.join(workdir, "comparison.json")))
    assert on_disk["seeds"] == [0, 1] and os.path.getsize(os.path.join(workdir, "comparison.png"))
    methods = on_disk["methods"]
    assert list(methods) == ["ideal", "d0", "uniform", "random", "regmix", "doremi"]
    for s in range(2):
        totals = {m: sum(methods[m]["volumes"][s].values()) for m in methods}
        steps = {m: methods[m]["train_steps"][s] for m in methods}
        assert len(set(totals.values())) == 1, totals  # equal volume
        assert min(steps.values()) > 0
        assert len(set(steps.values())) == 1, steps  # equal training: D0's optimizer steps
        tokens = {m: methods[m]["train_tokens"][s] for m in methods}
        assert min(tokens.values()) > 0, tokens
        # uniform: the same number of examples from every domain (up to rounding)
        vols = list(methods["uniform"]["volumes"][s].values())
        assert max(vols) - min(vols) <= 1
    # Paired to D0: the per-seed differences are the methods' scores minus D0's, seed by seed.
    for m in methods:
        per_seed = methods[m]["scores"]["average"]["vs_d0"]["per_seed"]
        d0 = [
            json.load(open(os.path.join(d, "eval.json")))["tasks"]["demo"]["per_capability"]
            for d in methods["d0"]["dirs"]
        ]
        mine = [
            json.load(open(os.path.join(d, "eval.json")))["tasks"]["demo"]["per_capability"]
            for d in methods[m]["dirs"]
        ]
        want = [np.mean(list(a.values())) - np.mean(list(b.values())) for a, b in zip(mine, d0)]
        assert per_seed == pytest.approx(want)
    assert methods["d0"]["scores"]["average"]["vs_d0"]["mean"] == 0.0
    assert "note" not in on_disk  # two seeds: intervals, no single-seed warning
    assert on_disk["regret"]["average_score"]["best_method"] in methods


def test_random_is_chosen_on_dev_and_reported_from_a_fresh_training_seed(compared):
    workdir, result = compared
    on_disk = json.load(open(os.path.join(workdir, "comparison.json")))["methods"]["random"]
    for s, seed_dir in enumerate(sorted(d for d in os.listdir(workdir) if d.startswith("seed_"))):
        losses = []
        for i in range(2):
            ev = json.load(open(os.path.join(workdir, seed_dir, f"random_{i}", "eval.json")))
            caps = [v for k, v in ev["reference_loss"].items() if k != "all"]
            losses.append(float(np.mean(caps)))
        best = int(np.argmin(losses))
        assert on_disk["chosen"][s] == best
        # The reported run is the chosen mixture retrained in random/ with another train seed.
        reported = result["methods"]["random"]["dirs"][s]
        assert reported == os.path.join(workdir, seed_dir, "random")
        chosen_mix = json.load(
            open(os.path.join(workdir, seed_dir, f"random_{best}", "mixture.json"))
        )
        reported_mix = json.load(open(os.path.join(reported, "mixture.json")))
        assert reported_mix["example_ids"] == chosen_mix["example_ids"]
        assert on_disk["train_seed"][s] != on_disk["selection_train_seed"][s]
    assert result["methods"]["random"]["reference_loss"]["n"] == 2
    assert on_disk["chosen_on"] == ["dev", "dev"]


def test_ideal_and_d0_are_rounds_of_one_loop_with_the_same_initialisation(compared):
    workdir, result = compared
    for s, seed in enumerate((0, 1)):
        d0_dir = result["methods"]["d0"]["dirs"][s]
        ideal_dir = result["methods"]["ideal"]["dirs"][s]
        assert d0_dir == os.path.join(workdir, f"seed_{seed}", "ideal", "round_0")
        assert ideal_dir == os.path.join(workdir, f"seed_{seed}", "ideal", "round_1")
        cfg = json.load(open(os.path.join(workdir, f"seed_{seed}", "ideal", "summary.json")))
        assert cfg["settings"]["seed"] == seed
    # IDEAL pays for its rounds and influence stages; D0 is one training (1 epoch here).
    assert result["methods"]["d0"]["compute_sft_epochs"]["mean"] == 1.0
    assert result["methods"]["ideal"]["compute_sft_epochs"]["mean"] > 2.0
    # random: k = 2 selection runs and the retraining of the chosen one
    assert result["methods"]["random"]["compute_sft_epochs"]["mean"] == 3.0


def test_rerun_resumes_without_training_again(compared):
    workdir, result = compared
    stamps = {
        p: os.path.getmtime(p)
        for p in (
            os.path.join(workdir, "seed_1", "uniform", "train", "summary.json"),
            os.path.join(workdir, "seed_0", "regmix", "eval.json"),
            os.path.join(workdir, "seed_0", "doremi", "proxy", "doremi.json"),
        )
    }
    again = main.run(_config(), workdir)
    assert again["methods"]["ideal"]["scores"] == result["methods"]["ideal"]["scores"]
    assert {p: os.path.getmtime(p) for p in stamps} == stamps


def _cli(workdir, *overrides):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ideal_jax.main",
            "--config",
            "configs/tiny.py",
            "--config.mode=compare",
            "--workdir",
            workdir,
            *overrides,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    "override, field",
    [
        ("--config.compare.methods=ideal,dpo", "compare.methods"),
        ("--config.compare.k=1", "compare.k"),
        ("--config.seeds=0", "seeds"),
    ],
)
def test_bad_input_exits_2_naming_the_field_before_any_work(tmp_path, override, field):
    workdir = str(tmp_path / "w")
    out = _cli(workdir, override)
    assert out.returncode == 2, out.stderr[-2000:]
    assert field in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(workdir)


def test_a_comparison_workdir_from_another_config_is_refused_and_kept(compared):
    workdir, _ = compared
    before = open(os.path.join(workdir, "comparison.json")).read()
    with pytest.raises(InputError, match="compare.k"):
        main.run(_config(**{"compare.k": 3}), workdir)
    assert open(os.path.join(workdir, "comparison.json")).read() == before
