"""llama.cpp GGUF files as ideal_jax models: config, de-quantized float32 parameters, tokenizer and
chat template, all read from the one `.gguf` file that `model.path` names.

Needs the optional `gguf` package (`pip install 'ideal_jax[gguf]'`). Supported: the Llama family
as llama.cpp writes it (`general.architecture` llama, which Mistral files use too, and qwen2), in
float or block-quantized types (SUPPORTED_TYPES); anything else is an InputError naming the
architecture, or the tensor and its type. Nothing is cached on disk: tensors are de-quantized one at
a time and placed with their sharding, as `hf_io.load_hf_params` does for safetensors.

llama.cpp's converter permutes the rows of q_proj / k_proj of Llama models (it interleaves the two
RoPE halves of each head); `unpermute_qk` undoes it so that the weights are Hugging Face's again.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from ideal_jax.model.config import ModelConfig
from ideal_jax.model.hf_layout import hf_tensor_names, tree_get, tree_set
from ideal_jax.model.transformer import Params, abstract_params
from ideal_jax.utils import progress
from ideal_jax.utils.errors import InputError

# general.architecture -> ours. Mistral GGUFs declare "llama" (same tensors, same permutation).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Tensor types de-quantized to float32 (all of them by the `gguf` package's reference code).
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
# GGUF tensor name (block suffixes) -> Hugging Face name, as in hf_layout.hf_tensor_names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def is_gguf(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(".gguf")


def _gguf_package():
    try:
        import gguf  # the PyPI package (this module is gguf_io)
    except ImportError:
        raise InputError(
            "reading .gguf files needs the gguf package: pip install 'ideal_jax[gguf]'",
            field="model.path",
        ) from None
    return gguf


def open_gguf(path: str):
    """A `gguf.GGUFReader` (memory-mapped), with unreadable files reported by name."""
    gguf = _gguf_package()
    if not os.path.isfile(path):
        raise InputError("no such GGUF file", path=path, field="model.path")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise InputError(f"not a readable GGUF file ({e})", path=path) from None


def _metadata(reader) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.ggml.") and name.endswith(("tokens", "merges", "type")):
            continue  # large arrays; the tokenizer is read by transformers
        try:
            out[name] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
    return out


def load_gguf_config(path: str, reader=None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a GGUF file; unsupported architectures and RoPE scalings are named."""
    reader = reader or open_gguf(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}",
            path=path,
            field="general.architecture",
        )
    tensor_names = {t.name for t in reader.tensors}

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise InputError("required metadata is missing", path=path, field=f"{arch}.{key}")
        if not isinstance(value, int | float):
            raise InputError(
                f"expected one number, got {type(value).__name__} (per-layer values are not "
                "supported)",
                path=path,
                field=f"{arch}.{key}",
            )
        return value

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise InputError(
            f"unsupported RoPE scaling {scaling if scaling != 'none' else 'rope_freqs'!r} "
            "(only unscaled RoPE is read from GGUF; convert such models to a Hugging Face "
            "directory instead)",
            path=path,
            field=f"{arch}.rope.scaling.type",
        )
    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise InputError("tensor missing", path=path, field="token_embd.weight")
    vocab = meta.get(f"{arch}.vocab_size") or int(embed.shape[-1])
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    values = dict(
        architecture=ARCHITECTURES[arch],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(head_dim or hidden // heads),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    values.update(overrides)
    return ModelConfig(**values)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face tensor name of a GGUF tensor name (None: not a model weight we read)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return None


def unpermute_qk(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q_proj / k_proj rows ([out, in]; n_head: heads of that proj).

    llama.cpp stores each head's rows as (E/2, 2) interleaved pairs; Hugging Face as (2, E/2)
    halves (rotate_half RoPE).
    """
    half = w_oi.shape[0] // n_head // 2
    return w_oi.reshape(n_head, half, 2, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def permute_qk(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): the inverse of `unpermute_qk`."""
    half = w_oi.shape[0] // n_head // 2
    return w_oi.reshape(n_head, 2, half, *w_oi.shape[1:]).swapaxes(1, 2).reshape(w_oi.shape)


def read_hf_tensors(path: str, cfg: ModelConfig, reader=None):
    """Yield (Hugging Face name, float32 array in Hugging Face layout), one tensor at a time."""
    gguf = _gguf_package()
    reader = reader or open_gguf(path)
    by_hf_name = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is not None:
            by_hf_name[name] = tensor
    wanted = hf_tensor_names(cfg)
    for name in wanted:  # check every type before de-quantizing anything
        tensor = by_hf_name.get(name)
        if tensor is None:
            raise InputError("tensor missing from the GGUF file", path=path, field=name)
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise InputError(
                f"unsupported quantization {tensor.tensor_type.name} of tensor {tensor.name!r}; "
                f"supported: {', '.join(SUPPORTED_TYPES)}",
                path=path,
                field=tensor.name,
            )
    for name in progress.bar(wanted, "load and de-quantize weights", unit="tensor"):
        tensor = by_hf_name[name]
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise InputError(
                f"cannot de-quantize {tensor.tensor_type.name} ({e})", path=path, field=tensor.name
            ) from None
        # GGUF shapes list the fastest-varying dimension first: reversed, they are Hugging Face's.
        array = np.asarray(array, dtype=np.float32).reshape(
            tuple(int(d) for d in tensor.shape[::-1])
        )
        if cfg.architecture == "llama" and name.endswith("q_proj.weight"):
            array = unpermute_qk(array, cfg.num_heads)
        elif cfg.architecture == "llama" and name.endswith("k_proj.weight"):
            array = unpermute_qk(array, cfg.num_kv_heads)
        yield name, array


def load_gguf_params(path: str, cfg: ModelConfig, shardings: Params | None = None) -> Params:
    """De-quantized float32 parameters, each placed directly with its sharding."""
    names = hf_tensor_names(cfg)
    shapes = abstract_params(cfg)
    params = jax.tree.map(lambda _: None, shapes)
    for name, array in read_hf_tensors(path, cfg):
        tree_path, transpose = names[name]
        expected = tuple(tree_get(shapes, tree_path).shape)
        if transpose:
            array = array.T
        if array.shape != expected:
            raise InputError(
                f"shape {array.shape[::-1] if transpose else array.shape} does not match the "
                f"metadata (expected {expected[::-1] if transpose else expected})",
                path=path,
                field=name,
            )
        sharding = (
            tree_get(shardings, tree_path)
            if shardings is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        tree_set(params, tree_path, _place(np.ascontiguousarray(array), sharding))
    return params


def _place(host: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def load_gguf_tokenizer(path: str):
    """The tokenizer and chat template stored in the GGUF file (transformers converts them)."""
    from transformers import AutoTokenizer

    _gguf_package()
    if not os.path.isfile(path):
        raise InputError("no such GGUF file", path=path, field="model.path")
    try:
        return AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)),
            gguf_file=os.path.basename(path),
            local_files_only=True,
        )
    except (ValueError, KeyError, OSError) as e:
        raise InputError(f"cannot read the tokenizer ({e})", path=path, field="tokenizer") from None
