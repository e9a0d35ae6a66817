"""Logit parity with transformers' PyTorch models on tiny random checkpoints written here."""

import jax
import numpy as np
import pytest

from ideal_jax.model import hf_io
from ideal_jax.model.transformer import forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
)

CASES = {
    "llama_gqa": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama3_rope_scaling": (
        "LlamaConfig",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    "llama_mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "qwen2_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=None)),
}


def _write_hf_model(tmp_path, case):
    config_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Random (non-trivial) norm scales and biases so the parity test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    path = tmp_path / case
    model.save_pretrained(path)
    return model, str(path)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model, path = _write_hf_model(tmp_path, case)
    cfg = hf_io.load_hf_config(path)
    params = hf_io.load_hf_params(path, cfg)
    tokens = np.random.default_rng(0).integers(0, COMMON["vocab_size"], (2, 40))
    ours = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t))(params, tokens))
    theirs = _torch_logits(model, tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["llama3_rope_scaling", "qwen2_tied"])
def test_export_roundtrip_through_transformers(tmp_path, case):
    _, path = _write_hf_model(tmp_path, case)
    cfg = hf_io.load_hf_config(path)
    params = hf_io.load_hf_params(path, cfg)
    out = str(tmp_path / "exported")
    hf_io.save_hf(out, cfg, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (2, 24))
    ours = np.asarray(forward(cfg, params, tokens))
    np.testing.assert_allclose(ours, _torch_logits(reloaded, tokens), atol=1e-4, rtol=0)
    assert hf_io.load_hf_config(out) == cfg
