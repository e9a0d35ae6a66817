"""Every config in configs/ builds, is locked, has the pipeline's sections, and its docstring
holds the command that runs it."""

import glob
import importlib
import os
import re

import pytest

from ideal_jax import stages
from ideal_jax.configlib.checks import CHOICES, validate_config
from ideal_jax.main import MODES
from ideal_jax.model.config import ModelConfig, preset
from ideal_jax.utils.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common"))
)
SECTIONS = ("data", "model", "train", "curvature", "influence", "reweight", "eval", "mesh", "daar")


@pytest.mark.parametrize("name", NAMES)
def test_config_builds(name):
    module = importlib.import_module(f"configs.{name}")
    cfg = module.get_config()
    assert cfg.is_locked
    assert cfg.mode in MODES
    for section in SECTIONS:
        assert section in cfg, section
    assert "python -m ideal_jax.main" in module.__doc__
    if not cfg.model.path:
        model = preset(cfg.model.preset, vocab_size=128).replace(dtype=cfg.model.dtype)
        assert isinstance(model, ModelConfig)
    assert cfg.train.checkpoint_every % cfg.train.log_every == 0  # exact resume needs it
    stages.load(cfg)


def test_paper_setting():
    from configs import llama3_8b_ideal

    cfg = llama3_8b_ideal.get_config("model=/ckpt/llama,data=/data/ideal")
    assert cfg.rounds == 2 and cfg.reweight.step_size == 0.15 and cfg.curvature.sigma == 0.5
    assert sorted(cfg.data.domains) == ["code", "instruction", "math", "reasoning"]
    assert cfg.model.path == "/ckpt/llama" and cfg.curvature.layers == "mlp"
    eight_b = preset("llama3_8b", 128256)
    assert 7.9e9 < eight_b.num_params() < 8.1e9
    with pytest.raises(ValueError, match="unknown argument"):
        llama3_8b_ideal.get_config("modle=/x")


def test_config_arguments_are_checked():
    from configs import demo

    assert demo.get_config("seeds=3,rounds=1").seeds == 3
    with pytest.raises(InputError, match="unknown field") as e:
        demo.get_config("sedes=3")
    assert e.value.field == "sedes"
    with pytest.raises(InputError, match="float") as e:
        demo.get_config("train.learning_rate=fast")
    assert e.value.field == "train.learning_rate"


def test_enumerated_fields_match_the_code():
    """CHOICES lists exactly what the consuming modules accept."""
    from ideal_jax.curvature import kfac, operators
    from ideal_jax.data import batching, formatting
    from ideal_jax.influence import alpha
    from ideal_jax.train import state

    choices = {k: set(v) for k, v in CHOICES.items()}
    assert choices["mode"] == set(MODES)
    assert choices["data.truncate"] == set(formatting.TRUNCATE_POLICIES)
    assert choices["data.batching"] == set(batching.MODES)
    assert choices["train.schedule"] == set(state.SCHEDULES)
    assert choices["curvature.estimator"] == set(kfac.ESTIMATION_MODES)
    assert choices["influence.operator"] == set(operators.OPERATORS)
    assert choices["influence.cg_preconditioner"] == set(operators.CG_PRECONDITIONERS)
    assert choices["influence.scaling"] == set(alpha.SCALINGS)
    if hasattr(alpha, "REFERENCE_WEIGHTINGS"):
        assert choices["influence.reference_weighting"] == set(alpha.REFERENCE_WEIGHTINGS)
    for dtype in CHOICES["model.dtype"]:
        preset("tiny", vocab_size=128).replace(dtype=dtype)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("reweight.rule", "bogus", "paper, optax"),
        ("curvature.correction", "per_token", "per_example, per_batch"),
        ("daar.generator", "llm", "model, file"),
        ("model.dtype", "float16", "float32, bfloat16"),
        ("reweight.optimizer", "adamx", "optax"),
        ("reweight.step_size", 0.0, "> 0"),
        ("reweight.beta_min", -1.5, "[-1, 0]"),
        ("curvature.sigma", 0.0, "(0, 1]"),
    ],
)
def test_validate_config_names_field_and_allowed_values(field, value, message):
    from configs import tiny

    cfg = tiny.get_config().unlock()
    section, leaf = field.split(".")
    cfg[section][leaf] = value
    with pytest.raises(InputError, match=re.escape(message)) as e:
        stages.load(cfg)  # the typed sections (reweight) check their own
    assert e.value.field == field


def test_validate_config_skips_absent_fields():
    validate_config({"mode": "eval", "train": {"schedule": "linear"}})
    with pytest.raises(InputError, match="'influence.reference_weighting'"):
        validate_config({"influence": {"reference_weighting": "example"}})
