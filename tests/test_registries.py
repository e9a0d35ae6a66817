"""A reweight rule and a baseline are added by registering them (docs/architecture.md, "Add a
reweight rule / a baseline"): the config accepts the new name, and the round or the comparison
runs it, with nothing else touched."""

import dataclasses

import numpy as np
import pytest
from config_helpers import set_fields, tiny_config

from configs import common
from ideal_jax import reweight, stages
from ideal_jax.compare import methods as methods_lib
from ideal_jax.compare import report
from ideal_jax.compare.config import CompareConfig
from ideal_jax.utils.errors import InputError


def _toy_rule_step(inputs: reweight.RuleInput):
    """Every domain down by m, but the one α ranks first, which takes the volume."""
    beta = np.full(len(inputs.d), -inputs.cfg.step_size)
    beta[int(np.argmax(inputs.d))] = inputs.cfg.step_size
    return beta, {"calls": 1}, None


def test_a_registered_rule_is_accepted_by_the_config_and_computes_the_step(monkeypatch):
    with pytest.raises(InputError, match="toy") as e:  # not registered: refused, naming the field
        stages.load(tiny_config(**{"reweight.rule": "toy"}))
    assert e.value.field == "reweight.rule"
    monkeypatch.setitem(reweight.RULES, "toy", reweight.Rule(_toy_rule_step, needs="alpha"))

    loaded = stages.load(tiny_config(**{"reweight.rule": "toy", "reweight.step_size": 0.2}))
    assert loaded.reweight.rule == "toy" and loaded.reweight.rule_needs == "alpha"
    cfg = dataclasses.replace(loaded.reweight, keep_total=False)
    step = reweight.compute_step(np.array([0.3, -0.5, 0.1]), [100, 100, 100], cfg)
    assert step.rule == "toy" and step.optimizer_state == {"calls": 1}
    np.testing.assert_array_equal(step.volumes_after, [80, 120, 80])  # the bounds still apply


def test_a_rule_declares_what_the_round_must_give_it():
    section = common.base_config().reweight
    needs = {
        rule: reweight.ReweightConfig.from_config_dict(section, rule=rule).rule_needs
        for rule in reweight.RULES
    }
    assert needs == {"paper": "alpha", "optax": "alpha", "outer": "outer"}


class _NoTraining(methods_lib.SeedRun):
    """A seed whose trainings are recorded, not run (the registry's path, without SFT)."""

    def train_on(self, name, weights, train_seed_offset=0):
        self.shared.setdefault("trained", []).append(name)
        weights = np.asarray(weights, float)
        metrics = {
            "scores": {"average": float(weights[0]), "cap": float(weights[0])},
            "reference_loss": float(1.0 - weights[0]),
            "volumes": dict(zip(self.names, (100 * weights).astype(int).tolist())),
            "train_steps": 4,
            "train_tokens": 40,
            "train_seed": 0,
            "dir": name,
        }
        return metrics, None


def _d0(s):  # D0 without the IDEAL loop: uniform proportions, one epoch
    metrics, _ = s.train_on("d0", [0.5, 0.5])
    s.shared["epoch_s"] = 1.0
    return metrics, 1.0


def _toy_baseline(s):
    """Twice D0's first proportion, chosen on nothing; needs D0 (its results are there)."""
    first = s.results["d0"]["volumes"]["a"] / 100
    metrics, _ = s.train_on("toy", [2 * first, 1 - 2 * first + 1e-9])
    return metrics, 3.0


def test_a_registered_baseline_is_accepted_run_and_reported(monkeypatch):
    cfg = set_fields(tiny_config(), {"compare.methods": "toy"}).lock()
    with pytest.raises(InputError, match="toy") as e:
        CompareConfig.from_config_dict(cfg.compare)
    assert e.value.field == "compare.methods"
    monkeypatch.setitem(methods_lib.METHODS, "d0", methods_lib.Method(_d0, chosen_on="none"))
    monkeypatch.setitem(
        methods_lib.METHODS,
        "toy",
        methods_lib.Method(_toy_baseline, chosen_on="none", needs=("d0",)),
    )

    settings = stages.load(cfg).compare
    assert settings.methods == ("d0", "toy")  # d0, the pairing base, always runs
    run = type("Run", (), {"d0_ids": {"a": ["1"], "b": ["2"]}})()
    seed = _NoTraining(cfg=cfg, sdir="/unused", run=run)
    results = methods_lib.run_methods(seed, settings.methods)
    assert seed.shared["trained"] == ["d0", "toy"]  # needs first, in registry order
    assert results["toy"]["volumes"] == {"a": 100, "b": 0}
    assert results["toy"]["compute_sft_epochs"] == 3.0 and results["toy"]["chosen_on"] == "none"

    per_seed = [{"methods": results, "seed": 0, "sft_epoch_s": 1.0}]
    reweight_cfg = reweight.ReweightConfig.from_config_dict(cfg.reweight)
    comparison = report.build(per_seed, cfg, settings, reweight_cfg)
    assert list(comparison["methods"]) == ["d0", "toy"]
    assert comparison["methods"]["toy"]["reference_loss"]["mean"] == pytest.approx(0.0, abs=1e-8)
    assert "toy" in report.format_table(comparison)
