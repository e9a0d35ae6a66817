"""Bad checkpoints give errors naming the file and the tensor or field."""

import json

import jax
import numpy as np
import pytest

from ideal_jax.model import hf_io
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params
from ideal_jax.utils.errors import InputError

CFG = ModelConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    num_layers=1,
)


def _export(tmp_path):
    path = tmp_path / "ckpt"
    hf_io.save_hf(str(path), CFG, init_params(CFG, jax.random.key(0)))
    return path


def test_roundtrip_without_torch(tmp_path):
    path = _export(tmp_path)
    params = hf_io.load_hf_params(str(path), hf_io.load_hf_config(str(path)))
    ref = init_params(CFG, jax.random.key(0))
    np.testing.assert_array_equal(
        params["layers"][0]["mlp"]["up_proj"]["kernel"],
        ref["layers"][0]["mlp"]["up_proj"]["kernel"],
    )


def test_missing_config_field(tmp_path):
    path = _export(tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"config.json.*hidden_size"):
        hf_io.load_hf_config(str(path))


def test_unknown_architecture(tmp_path):
    path = _export(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="unknown architecture"):
        hf_io.load_hf_config(str(path))


def test_missing_weights_file_and_missing_shard(tmp_path):
    path = _export(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no model.safetensors"):
        hf_io.load_hf_params(str(path), CFG)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="model-00001-of-00002.safetensors.*missing"):
        hf_io.load_hf_params(str(path), CFG)


def test_shape_mismatch_names_tensor(tmp_path):
    path = _export(tmp_path)
    wrong = CFG.replace(intermediate_size=48)
    with pytest.raises(InputError, match=r"model.safetensors.*mlp.gate_proj.weight.*shape"):
        hf_io.load_hf_params(str(path), wrong)


def test_missing_tensor_named(tmp_path):
    path = _export(tmp_path)
    with pytest.raises(InputError, match="model.layers.1"):
        hf_io.load_hf_params(str(path), CFG.replace(num_layers=2))


def test_sharded_index_checkpoint_loads(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _export(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    files = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for fname, keys in files.items():
        save_file({k: tensors[k] for k in keys}, str(path / fname))
    (path / "model.safetensors").unlink()
    weight_map = {k: f for f, keys in files.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = hf_io.load_hf_params(str(path), CFG)
    ref = init_params(CFG, jax.random.key(0))
    np.testing.assert_array_equal(params["embed_tokens"], ref["embed_tokens"])
