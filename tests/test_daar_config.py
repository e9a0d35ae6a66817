"""cfg.daar and DaarConfig: every knob set from the config, defaults only there, bad input.

Bad input through the command line exits 2 with one line naming the domain and the field (empty
domain list, τ outside (0, 1]); the probe-overlap and unparseable-generator cases run `main.run`
in-process (the same path, without the second interpreter start).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from configs import common, daar_demo
from ideal_jax import main
from ideal_jax.daar import pipeline
from ideal_jax.daar.config import STAGE_FIELDS, DaarConfig, DomainSpec
from ideal_jax.utils.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fields():
    return [f for f in dataclasses.fields(DaarConfig) if f.name != "domains"]


def test_defaults_live_in_cfg_daar_only():
    """DaarConfig has no defaults of its own; configs/common.py's cfg.daar holds every field."""
    with_default = [
        f.name
        for f in dataclasses.fields(DaarConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert not with_default, f"defaults belong in configs/common.py's cfg.daar: {with_default}"
    section = common.base_config().daar
    section.domains = {"reasoning": "Solve a logic puzzle."}
    cfg = DaarConfig.from_section(section)  # every field present, defaults valid
    for f in _fields():
        expected = section[f.name]
        if f.name == "customized_target":
            expected = expected or None
        elif isinstance(expected, tuple | list):
            expected = tuple(expected)
        assert getattr(cfg, f.name) == expected, f.name
    assert cfg.domains == (DomainSpec("reasoning", "Solve a logic puzzle.", 0.85),)


@pytest.mark.parametrize("name", [f.name for f in _fields()])
def test_a_field_missing_from_the_config_is_named(name):
    section = common.base_config().daar.to_dict()
    section["domains"] = {"a": "x"}
    del section[name]
    with pytest.raises(InputError, match=f"no field '{name}'") as e:
        DaarConfig.from_section(section)
    assert e.value.field == f"daar.{name}"


def test_every_field_is_fingerprinted_by_a_stage():
    """A field no stage lists would change results without invalidating a cached artifact."""
    listed = {name for names in STAGE_FIELDS.values() for name in names}
    assert {f.name for f in dataclasses.fields(DaarConfig)} <= listed


def test_every_field_reaches_the_pipeline():
    """A non-default value of every cfg.daar field survives into DaarConfig and its users."""
    section = common.base_config().daar
    section.domains = {"a": "x"}
    changed = dict(
        seeds_per_domain=4, target_per_domain=12, min_per_domain=2, max_attempts_per_domain=50,
        counter_examples=2, seed_temperature=0.7, augment_temperature=0.8, top_p=0.9,
        max_new_tokens=64, centroid_source="hidden", centroid_layer=1, feature_layer=2,
        feature_norm=False, max_len=32, embed_batch_size=16, kmeans_metric="cosine",
        kmeans_max_iters=10, probe_lr=1e-4, probe_epochs=3, probe_batch_size=8,
        probe_hidden=(16, 8), probe_val_fraction=0.1, probe_weight_decay=0.01, probe_patience=2,
        probe_cross_fit_folds=3, select_fraction=0.3, select_method="per_domain",
        customized_target="a", customized_fractions=(0.6, 0.2), seed=7,
    )  # fmt: skip
    assert set(changed) == {f.name for f in _fields()}, "a DaarConfig field this test does not set"
    for key, value in changed.items():
        section[key] = value
    cfg = DaarConfig.from_section(section)
    assert {key: getattr(cfg, key) for key in changed} == changed
    assert all(
        cfg.fingerprint(s)
        != DaarConfig.from_section(
            common.base_config().daar.to_dict() | {"domains": {"a": "x"}}
        ).fingerprint(s)
        for s in STAGE_FIELDS
    )
    kwargs = cfg.probe_kwargs()
    assert kwargs == dict(
        hidden=(16, 8), lr=1e-4, epochs=3, batch_size=8, val_fraction=0.1, weight_decay=0.01,
        patience=2, seed=7,
    )  # fmt: skip
    emb = pipeline.embedder(cfg, None, None, None, None)
    assert (emb.centroid_source, emb.centroid_layer, emb.feature_layer) == ("hidden", 1, 2)
    assert (emb.feature_norm, emb.max_len, emb.batch_size) == (False, 32, 16)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kmeans_metric", "manhattan", "cosine, euclidean"),
        ("centroid_source", "output", "input, hidden"),
        ("probe_cross_fit_folds", 1, "0 (off) or >= 2"),
        ("probe_val_fraction", 1.0, "[0, 1)"),
        ("probe_lr", 0.0, "> 0"),
        ("probe_epochs", 0, ">= 1"),
        ("top_p", 0.0, "(0, 1]"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    section = common.base_config().daar
    section.domains = {"a": "x"}
    section[field] = value
    with pytest.raises(InputError, match=re.escape(message)) as e:
        DaarConfig.from_section(section)
    assert e.value.field == f"daar.{field}"


def test_patience_needs_a_validation_split():
    section = common.base_config().daar.to_dict() | {"domains": {"a": "x"}, "probe_patience": 2}
    with pytest.raises(InputError, match="validation split") as e:
        DaarConfig.from_section(section | {"probe_val_fraction": 0.0})
    assert e.value.field == "daar.probe_patience"


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.5, float("nan"), "high"])
def test_tau_outside_unit_interval_names_domain_and_field(tau):
    cfg = daar_demo.get_config().unlock()
    cfg.daar.tau = {"sort": tau}
    with pytest.raises(InputError, match="'sort'.*tau") as e:
        DaarConfig.from_section(cfg.daar)
    assert e.value.field == "daar.tau.sort"
    cfg.daar.tau = {"sort": 1.0}  # the closed end is allowed
    assert {d.name: d.tau for d in DaarConfig.from_section(cfg.daar).domains}["sort"] == 1.0


def test_empty_description_names_the_domain():
    cfg = daar_demo.get_config().unlock()
    cfg.daar.domains = dict(daar_demo.DESCRIPTIONS, sort=" ")
    with pytest.raises(InputError, match="'sort'") as e:
        DaarConfig.from_section(cfg.daar)
    assert e.value.field == "daar.domains.sort"


def _cli(tmp_path, body: str):
    """`python -m ideal_jax.main` on a config file that edits configs/daar_demo.py."""
    config = tmp_path / "bad_daar.py"
    config.write_text(
        "from configs import daar_demo\n\n\ndef get_config(arg=None):\n"
        "    cfg = daar_demo.get_config().unlock()\n"
        + textwrap.indent(textwrap.dedent(body), "    ")
        + "    return cfg.lock()\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "ideal_jax.main", f"--config={config}", f"--workdir={tmp_path}/w"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "body, expected",
    [
        ("cfg.daar.domains = {}\n", ["'daar.domains'", "description list is empty"]),
        ("cfg.daar.tau = {'lookup': 1.5}\n", ["'daar.tau.lookup'", "domain 'lookup'", "1.5"]),
    ],
    ids=["empty_domains", "tau_above_1"],
)
def test_cli_bad_daar_input_exits_2(tmp_path, body, expected):
    proc = _cli(tmp_path, body)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])


def _small_demo(tmp_path):
    cfg = daar_demo.get_config().unlock()
    cfg.progress = False
    cfg.data.demo_train_sizes = dict(arithmetic=12, reverse=12, sort=12, lookup=12, uppercase=12)
    cfg.data.demo_n_test = 4
    cfg.data.demo_n_ref = 6
    return cfg


def _write_pool(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_probe_set_overlapping_the_pool_is_refused(tmp_path):
    cfg = _small_demo(tmp_path)
    records = [
        {"id": f"ex{i}", "prompt": f"reverse: word{i}", "response": f"{i}drow"} for i in range(12)
    ]
    cfg.daar.pool = _write_pool(tmp_path / "pool.jsonl", records)
    # Same texts under other ids: still the same examples.
    renamed = [dict(r, id=f"probe{i}") for i, r in enumerate(records[:6])]
    cfg.daar.probe = _write_pool(tmp_path / "probe.jsonl", renamed)
    with pytest.raises(InputError, match="overlaps the pool: 6 probe examples") as e:
        main.run(cfg, str(tmp_path / "w_text"))
    assert e.value.field == "daar.probe"
    cfg.daar.probe = cfg.daar.pool  # the very same file
    with pytest.raises(InputError, match="overlaps the pool: 12 example ids") as e:
        main.run(cfg, str(tmp_path / "w_ids"))
    assert e.value.field == "daar.probe"


def test_generator_that_never_yields_a_parseable_pair_names_the_domain(tmp_path):
    cfg = _small_demo(tmp_path)
    cfg.daar.max_attempts_per_domain = 20
    pairs = [
        {"domain": name, "prompt": f"a {name} task {i}", "response": f"answer {i}"}
        for name in daar_demo.DESCRIPTIONS
        for i in range(6)
    ]
    # lookup's "pairs" have no response: nothing the generator writes for lookup ever parses.
    pairs = [dict(p, response="") if p["domain"] == "lookup" else p for p in pairs]
    cfg.daar.seed_pairs = _write_pool(tmp_path / "pairs.jsonl", pairs)
    cfg.daar.tau = {name: 1.0 for name in daar_demo.DESCRIPTIONS}  # the others pass easily
    with pytest.raises(InputError, match="domain 'lookup' accepted only 0 pairs") as e:
        main.run(cfg, str(tmp_path / "w"))
    assert "20 unparseable" in str(e.value)
    assert e.value.field == "daar.domains[lookup]"
