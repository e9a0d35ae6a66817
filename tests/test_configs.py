"""Every config in configs/ builds, is locked, has the pipeline's sections, and its docstring
holds the command that runs it."""

import glob
import importlib
import os

import pytest

from ideal_jax.main import MODES
from ideal_jax.model.config import ModelConfig, preset

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
    with pytest.raises(ValueError, match="unknown field"):
        demo.get_config("sedes=3")
