"""Hugging Face checkpoints from and to a local directory (config.json + safetensors).

Loading reads each tensor lazily from a memory map and builds every parameter with
`jax.make_array_from_callback`, so each device receives only its own shard: no full copy of the
model is ever materialised on one device. Errors name the file and the tensor or field.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

from ideal_jax.model import gguf_io
from ideal_jax.model.config import ModelConfig, RopeScaling
from ideal_jax.model.hf_layout import hf_tensor_names, tree_get, tree_set
from ideal_jax.model.transformer import Params, abstract_params
from ideal_jax.utils import progress
from ideal_jax.utils.atomic import atomic_path, write_json_atomic
from ideal_jax.utils.errors import InputError

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
_SAFETENSORS_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F64": np.float64,
}


def load_hf_config(model_dir: str, **overrides: Any) -> ModelConfig:
    """Read `config.json` into a ModelConfig; missing fields and unknown architectures are named.

    `model_dir` may also name a llama.cpp `.gguf` file (ideal_jax.model.gguf_io).
    """
    if gguf_io.is_gguf(model_dir):
        return gguf_io.load_gguf_config(model_dir, **overrides)
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise InputError("no config.json in the checkpoint directory", path=path)
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e})", path=path) from None
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    arch = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), None)
    if arch is None and model_type in _HF_ARCHITECTURES.values():
        arch = model_type
    if arch is None:
        raise InputError(
            f"unknown architecture {archs or model_type!r}; supported: "
            f"{', '.join(_HF_ARCHITECTURES)}",
            path=path,
            field="architectures",
        )

    def need(name):
        if name not in hf:
            raise InputError("required field is missing", path=path, field=name)
        return hf[name]

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise InputError(
            f"unsupported rope_type {rope_type!r} (default or llama3)",
            path=path,
            field="rope_scaling",
        )
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    window = hf.get("sliding_window")
    if arch == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    eos = hf.get("eos_token_id")
    values = dict(
        architecture=arch,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
        sliding_window=window,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        initializer_range=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    values.update(overrides)
    return ModelConfig(**values)


class _SafetensorsFile:
    """Minimal lazy reader: header parsed once, tensors memory-mapped on demand."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise InputError(
                        f"truncated or not a safetensors file: its header claims {header_len} "
                        f"bytes, the file has {size} (an interrupted download?)",
                        path=path,
                    )
                self.header = json.loads(f.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"not a readable safetensors file ({e})", path=path) from None
        if not isinstance(self.header, dict):
            raise InputError("not a safetensors file (its header is not an object)", path=path)
        self.header.pop("__metadata__", None)
        self.offset = 8 + header_len
        self._mmap = None
        for name, info in self.header.items():
            self._check_entry(name, info, size)

    def _check_entry(self, name: str, info: Any, size: int) -> None:
        """Each tensor's entry is well formed and its bytes lie inside the file: a truncated
        file is named here, not met as a reshape error while the weights are placed."""
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or isinstance(shape, str):
                raise ValueError(shape)
            count = int(np.prod(shape, dtype=np.int64))
            start, end = int(start), int(end)
        except (TypeError, KeyError, ValueError):
            raise InputError(
                "malformed tensor entry (expected dtype, shape, data_offsets)",
                path=self.path,
                field=name,
            ) from None
        if dtype in _SAFETENSORS_DTYPES:
            needed = count * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
            if end - start != needed or start < 0:
                raise InputError(
                    f"data_offsets [{start}, {end}] do not hold {dtype} {shape} ({needed} bytes)",
                    path=self.path,
                    field=name,
                )
        if self.offset + end > size:
            raise InputError(
                f"truncated: the tensor ends at byte {self.offset + end}, the file has {size} "
                "bytes (an interrupted download or copy?); download it again",
                path=self.path,
                field=name,
            )

    def tensor(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise InputError(f"unsupported dtype {info['dtype']}", path=self.path, field=name)
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        raw = self._mmap[self.offset + start : self.offset + end]
        return raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _open_checkpoint(model_dir: str) -> dict[str, _SafetensorsFile]:
    """Tensor name -> file, for a single `model.safetensors` or a sharded index."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise InputError("index has no weight_map", path=index_path, field="weight_map")
        files: dict[str, _SafetensorsFile] = {}
        out = {}
        for name, fname in weight_map.items():
            fpath = os.path.join(model_dir, fname)
            if fname not in files:
                if not os.path.exists(fpath):
                    raise InputError(f"shard listed for tensor {name!r} is missing", path=fpath)
                files[fname] = _SafetensorsFile(fpath)
            out[name] = files[fname]
        return out
    if os.path.exists(single):
        st = _SafetensorsFile(single)
        return {name: st for name in st.header}
    raise InputError("no model.safetensors or model.safetensors.index.json", path=model_dir)


def load_hf_params(model_dir: str, cfg: ModelConfig, shardings: Params | None = None) -> Params:
    """Parameters from safetensors, float32, each placed directly with its sharding.

    shardings: a pytree of `jax.sharding.Sharding` matching the params (see ideal_jax.sharding);
      None places everything on the default device. A `.gguf` file is de-quantized (gguf_io).
    """
    if gguf_io.is_gguf(model_dir):
        return gguf_io.load_gguf_params(model_dir, cfg, shardings)
    files = _open_checkpoint(model_dir)
    shapes = abstract_params(cfg)
    params = jax.tree.map(lambda _: None, shapes)
    names = hf_tensor_names(cfg)
    for name, (path, transpose) in progress.bar(names.items(), "load weights", unit="tensor"):
        if name not in files:
            raise InputError("tensor missing from the checkpoint", path=model_dir, field=name)
        st = files[name]
        info = st.header[name]
        expected = tree_get(shapes, path).shape
        got = tuple(info["shape"][::-1] if transpose else info["shape"])
        if got != tuple(expected):
            raise InputError(
                f"shape {tuple(info['shape'])} does not match the config "
                f"(expected {tuple(expected[::-1] if transpose else expected)})",
                path=st.path,
                field=name,
            )
        sharding = (
            tree_get(shardings, path)
            if shardings is not None
            else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        tree_set(params, path, _place(st, name, transpose, expected, sharding))
    return params


def _place(st: _SafetensorsFile, name: str, transpose: bool, shape, sharding) -> jax.Array:
    def shard(index: tuple[slice, ...]) -> np.ndarray:
        array = st.tensor(name)
        if transpose:
            array = array.T
        return np.asarray(array[index], dtype=np.float32)

    return jax.make_array_from_callback(tuple(shape), sharding, shard)


def save_hf(
    model_dir: str,
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any | None = None,
    dtype: str = "float32",
) -> None:
    """Write config.json + model.safetensors that `transformers.AutoModelForCausalLM` loads."""
    from safetensors.numpy import save_file

    os.makedirs(model_dir, exist_ok=True)
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    tensors = {}
    for name, (path, transpose) in hf_tensor_names(cfg).items():
        array = np.asarray(jax.device_get(tree_get(params, path)), dtype=np.float32)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array).astype(np_dtype)
    with atomic_path(os.path.join(model_dir, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json_atomic(os.path.join(model_dir, "config.json"), hf_config_dict(cfg, dtype))
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)


def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    arch = {v: k for k, v in _HF_ARCHITECTURES.items()}[cfg.architecture]
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=rs.factor,
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    out = {
        "architectures": [arch],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.initializer_range,
        "torch_dtype": dtype,
        "dtype": dtype,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": rope if cfg.rope_scaling is not None else None,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.architecture == "llama":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    if cfg.architecture == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "qwen2":
        out.update(
            use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window
        )
    return out


def load_tokenizer(path: str) -> Callable:
    """`transformers.AutoTokenizer` from a local directory or `.gguf` file (never the hub)."""
    from transformers import AutoTokenizer

    if gguf_io.is_gguf(path):
        return gguf_io.load_gguf_tokenizer(path)

    if not os.path.isdir(path):
        raise InputError("tokenizer directory does not exist", path=path)
    present = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(path, f))]
    if not present:
        raise InputError(
            f"no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); copy the "
            "model's tokenizer files there or set data.tokenizer to a directory that has them",
            path=path,
        )
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise InputError(
            f"the tokenizer files ({', '.join(present)}) do not load: {type(e).__name__}: {detail}",
            path=path,
        ) from None


# Files a Hugging Face tokenizer directory holds (one of them at least).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
