"""mode=daar from a config, and DaaR pseudo-domains as IDEAL's domains (labels hidden)."""

import json
import os

import pytest

from configs import daar_demo
from ideal_jax import main
from ideal_jax.daar.config import DaarConfig
from ideal_jax.utils.errors import InputError


def _small(cfg):
    cfg.progress = False
    cfg.data.demo_train_sizes = dict(arithmetic=40, reverse=80, sort=60, lookup=60, uppercase=60)
    cfg.data.demo_n_test = 8
    cfg.data.demo_n_ref = 12
    cfg.daar.probe_epochs = 5
    cfg.train.epochs = 1
    cfg.eval.limit = 4
    return cfg


def test_daar_mode_selects_and_pseudo_labels_match_hidden_domains(tmp_path):
    cfg = _small(daar_demo.get_config())
    out = main.run(cfg, str(tmp_path))
    manifest = json.load(open(out["manifest"]))
    assert manifest["n_selected"] == round(0.2 * manifest["n_pool"])
    # The demo's capabilities are easy to tell apart: pseudo-domain sizes track the hidden ones
    # (on this small pool ~90% of examples land in their true domain; the full demo reaches 100%).
    hidden = {"arithmetic": 40, "lookup": 60, "reverse": 80, "sort": 60, "uppercase": 60}
    found = manifest["pool_counts_per_pseudo_domain"]
    assert sum(found.values()) == sum(hidden.values())
    assert all(abs(found[d] - n) <= 0.25 * n for d, n in hidden.items()), found
    assert os.path.getsize(out["selected"]) > 0


@pytest.mark.slow
def test_ideal_on_pseudo_domains(tmp_path):
    cfg = _small(daar_demo.get_config("ideal=1"))
    cfg.rounds = 1
    result = main.run(cfg, str(tmp_path))
    assert set(result["rounds"][0]["mixture"]) == set(daar_demo.DESCRIPTIONS)


def test_tau_for_unknown_domain_is_an_error():
    cfg = daar_demo.get_config()
    cfg.unlock()
    cfg.daar.tau = {"geometry": 0.9}
    with pytest.raises(InputError, match="geometry"):
        DaarConfig.from_section(cfg.daar)
