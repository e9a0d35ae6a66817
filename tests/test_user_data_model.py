"""Damaged model files (issue 27 item 6): a truncated safetensors file, a model directory without
a tokenizer, and the other ways tests/hostile_data.py breaks them are an InputError naming the
file (and the tensor when there is one), as a truncated .gguf already was."""

import struct

import jax
import numpy as np
import pytest
from hostile_data import broken_safetensors, safetensors_bytes

from ideal_jax.data import demo_suite
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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model"
    hf_io.save_hf(str(path), CFG, init_params(CFG, jax.random.key(0)))
    return path


BROKEN = sorted(broken_safetensors(safetensors_bytes({"w": ("F32", [2], b"\0" * 8)})))


@pytest.mark.parametrize("damage", BROKEN)
def test_damaged_safetensors_is_named(tmp_path, exported, damage):
    good = (exported / "model.safetensors").read_bytes()
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((exported / "config.json").read_bytes())
    (model / "model.safetensors").write_bytes(broken_safetensors(good)[damage])
    with pytest.raises(InputError) as info:
        hf_io.load_hf_params(str(model), CFG)
    assert info.value.path == str(model / "model.safetensors"), str(info.value)


def test_truncation_names_the_first_tensor_cut(tmp_path, exported):
    good = (exported / "model.safetensors").read_bytes()
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="truncated: the tensor ends at byte") as info:
        hf_io.load_hf_params(str(model), CFG)
    assert info.value.field is not None and info.value.field.startswith("model.")


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},  # too few bytes for the shape
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},  # shape not a list
        {"dtype": "F32", "shape": [2]},  # no offsets
        {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
        [1, 2, 3],  # not an object
    ],
)
def test_malformed_tensor_entry_is_named(tmp_path, entry):
    import json

    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(InputError) as info:
        hf_io._SafetensorsFile(str(path))
    assert info.value.path == str(path) and info.value.field == "w", str(info.value)


def test_an_intact_file_still_loads(exported):
    params = hf_io.load_hf_params(str(exported), CFG)
    ref = init_params(CFG, jax.random.key(0))
    np.testing.assert_array_equal(
        params["layers"][0]["mlp"]["up_proj"]["kernel"],
        ref["layers"][0]["mlp"]["up_proj"]["kernel"],
    )


def test_model_directory_without_a_tokenizer_is_named(tmp_path, exported):
    """model.path = a directory of weights and config.json only (tokenizer files not copied):
    transformers' "Couldn't instantiate the backend tokenizer" traceback before."""
    with pytest.raises(InputError, match="no tokenizer in this directory") as info:
        hf_io.load_tokenizer(str(exported))
    assert info.value.path == str(exported)


@pytest.mark.parametrize(
    "damage",
    ["tokenizer_json_cut", "tokenizer_json_not_json", "config_only"],
)
def test_damaged_tokenizer_files_are_named(tmp_path, damage):
    tok_dir = tmp_path / "tok"
    demo_suite.build_tokenizer().save_pretrained(str(tok_dir))
    tokenizer_json = tok_dir / "tokenizer.json"
    if damage == "tokenizer_json_cut":
        tokenizer_json.write_bytes(tokenizer_json.read_bytes()[:100])
    elif damage == "tokenizer_json_not_json":
        tokenizer_json.write_text("<html>404</html>")
    else:
        tokenizer_json.unlink()
    with pytest.raises(InputError, match="do not load") as info:
        hf_io.load_tokenizer(str(tok_dir))
    assert info.value.path == str(tok_dir)
