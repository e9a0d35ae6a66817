"""GGUF import on tiny files written here with the `gguf` package's writer, the way llama.cpp's
converter writes them (q/k rows permuted, Q8_0 / F16 / F32 tensors, a byte-level BPE tokenizer and
a chat template); skipped when the optional `gguf` package is absent."""

import jax
import numpy as np
import pytest

from ideal_jax.model import gguf_io, hf_io
from ideal_jax.model.transformer import forward
from ideal_jax.utils.errors import InputError

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
Q = gguf.GGMLQuantizationType
_BLOCK = {v: k for k, v in gguf_io._BLOCK_NAMES.items()}
_GLOBAL = {v: k for k, v in gguf_io._GLOBAL_NAMES.items()}


def _byte_tokens():
    """GPT-2's byte-to-unicode alphabet (what a byte-level BPE vocabulary starts with)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _tiny_hf_model(arch: str):
    tokens = SPECIALS + _byte_tokens() + ["he", "ll", "hell", "hello"]
    common = dict(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=10000.0)
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model, tokens


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_BLOCK[rest]}"


def write_tiny_gguf(path, arch="llama", quant=Q.Q8_0, gguf_arch=None):
    """Write a tiny model as llama.cpp would; returns (torch model, expected HF tensors)."""
    model, tokens = _tiny_hf_model(arch)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), gguf_arch or arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(["h e", "l l", "he ll", "hell o"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        stored = w
        if arch == "llama" and name.endswith("q_proj.weight"):
            stored = gguf_io.permute_qk(w, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            stored = gguf_io.permute_qk(w, cfg.num_key_value_heads)
        if name == "model.embed_tokens.weight":
            writer.add_tensor(_gguf_name(name), stored.astype(np.float16))
            expected[name] = w.astype(np.float16).astype(np.float32)
        elif w.ndim == 2 and quant == Q.IQ4_NL:  # no quantizer in gguf: random blocks
            shape = gguf.quants.quant_shape_to_byte_shape(w.shape, quant)
            data = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
            writer.add_tensor(_gguf_name(name), data, raw_dtype=quant)
        elif w.ndim == 2:
            data = gguf.quants.quantize(stored, quant)
            writer.add_tensor(_gguf_name(name), data, raw_dtype=quant)
            expected[name] = gguf.quants.dequantize(gguf.quants.quantize(w, quant), quant)
        else:
            writer.add_tensor(_gguf_name(name), stored)
            expected[name] = w
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cfg.tie_word_embeddings:
        expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
    if quant != Q.IQ4_NL:
        model.load_state_dict({k: torch.tensor(v) for k, v in expected.items()})
    return model, expected


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_weights_and_logits(tmp_path, arch):
    """De-quantized, un-permuted weights equal the expected HF tensors; logits match torch."""
    path = str(tmp_path / "tiny.gguf")
    model, expected = write_tiny_gguf(path, arch)
    cfg = hf_io.load_hf_config(path)
    assert (cfg.architecture, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (arch, 4, 2, 16)
    assert cfg.tie_word_embeddings == (arch == "qwen2")
    assert cfg.attention_bias == (arch == "qwen2")
    params = hf_io.load_hf_params(path, cfg)
    for name, array in gguf_io.read_hf_tensors(path, cfg):
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    ours = np.asarray(jax.jit(lambda p, t: forward(cfg, p, t))(params, tokens))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    permuted = gguf_io.permute_qk(w, 8)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(permuted, 8), w)


def test_gguf_tokenizer_and_chat_template(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path)
    tok = hf_io.load_tokenizer(path)
    assert tok.decode(tok("hello world")["input_ids"]) == "hello world"
    assert tok.convert_tokens_to_ids("hello") in tok("hello")["input_ids"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.eos_token == "<|im_end|>"


def test_unsupported_architecture_is_named(tmp_path):
    path = str(tmp_path / "phi.gguf")
    write_tiny_gguf(path, gguf_arch="phi3")
    with pytest.raises(InputError, match="unsupported GGUF architecture 'phi3'") as e:
        hf_io.load_hf_config(path)
    assert e.value.path == path and e.value.field == "general.architecture"


def test_unsupported_quantization_is_named(tmp_path):
    path = str(tmp_path / "iq.gguf")
    write_tiny_gguf(path, quant=Q.IQ4_NL)
    cfg = hf_io.load_hf_config(path)
    with pytest.raises(InputError, match="unsupported quantization IQ4_NL") as e:
        hf_io.load_hf_params(path, cfg)
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert e.value.path == path and e.value.field in names and e.value.field in str(e.value)
