"""The run's base model from cfg.model: a local Hugging Face checkpoint or .gguf file (loaded
sharded), or a random-initialised preset sized to the tokenizer (initialised sharded)."""

from __future__ import annotations

import functools
from typing import Any

import jax

from ideal_jax import sharding
from ideal_jax.model import hf_io
from ideal_jax.model.config import ModelConfig, preset
from ideal_jax.model.transformer import abstract_params, init_params, logical_axes
from ideal_jax.utils import progress


def model_config(model_section, tokenizer) -> ModelConfig:
    """The architecture: read from model.path (HF dir or .gguf), else the preset sized to the
    tokenizer."""
    extra = dict(dtype=model_section.dtype, remat=model_section.remat)
    if model_section.path:
        return hf_io.load_hf_config(model_section.path, **extra)
    return preset(model_section.preset, vocab_size=len(tokenizer)).replace(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )


def load_model(model_section, mesh, tokenizer, *, seed: int) -> tuple[ModelConfig, Any]:
    """(architecture, parameters placed on `mesh`); a preset is initialised from key `seed`."""
    with progress.stage("load model"):
        model_cfg = model_config(model_section, tokenizer)
        abstract_and_axes = (abstract_params(model_cfg), logical_axes(model_cfg))
        if model_section.path:
            shardings = sharding.param_shardings(*abstract_and_axes, mesh)
            return model_cfg, hf_io.load_hf_params(model_section.path, model_cfg, shardings)
        params, _ = sharding.sharded_init(
            functools.partial(init_params, model_cfg),
            *abstract_and_axes,
            mesh,
            jax.random.key(seed),
        )
        return model_cfg, params
