"""Which linear layers the curvature H covers, and how parameters split into (selected, rest).

Layers are named by dotted parameter paths ("layers.0.mlp.gate_proj"), the same names the model uses
for `KfacTags`. A layer is any dict in the parameter tree that holds a 2-D "kernel" [D_in, D_out]
(and optionally a "bias" [D_out]). Selection is by regular expressions over those paths (full
match); the paper's default is the MLP projections (METHOD §1.1), which is also Kronfluence's.

H is restricted to the selected layers by differentiating only `selected` (a flat dict path → layer
dict) while the rest of the parameters are closed over (`merge_params`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ideal_jax.utils.errors import InputError

Params = dict[str | int, Any]

# Presets: the paper uses the MLP projections; attention and the LM head are excluded there.
LAYER_PRESETS: dict[str, tuple[str, ...]] = {
    "mlp": (r"layers\.\d+\.mlp\.(gate|up|down)_proj",),
    "attention": (r"layers\.\d+\.self_attn\.(q|k|v|o)_proj",),
    "all_linear": (r"layers\.\d+\.(mlp|self_attn)\.\w+",),
    # LoRA adapters (train.finetuning = lora): both matmuls of every adapter, each a dense layer
    # "lora.layers.N.<block>.<proj>.lora_a" [D_in, r] / ".lora_b" [r, D_out] (model/lora.py).
    "lora": (r"lora\.layers\.\d+\.\w+\.\w+\.lora_[ab]",),
}
DEFAULT_PRESET = "mlp"

# An output factor bigger than this (bytes, f32) triggers a warning: the LM head's vocab² factor.
LARGE_FACTOR_BYTES = 1 << 30


def _items(node: Any) -> Iterable[tuple[str | int, Any]]:
    if isinstance(node, Mapping):
        return node.items()
    if isinstance(node, (list, tuple)):
        return enumerate(node)
    return ()


def linear_layer_paths(params: Params) -> dict[str, tuple[int, int]]:
    """Every linear layer in `params`: dotted path → (D_in, D_out) of its kernel."""
    found: dict[str, tuple[int, int]] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, Mapping) and "kernel" in node and len(node["kernel"].shape) == 2:
            found[".".join(prefix)] = tuple(int(d) for d in node["kernel"].shape)
            return
        for key, child in _items(node):
            walk(child, (*prefix, str(key)))

    walk(params, ())
    return found


def factor_bytes(d_in: int, d_out: int, *, has_bias: bool = False, itemsize: int = 4) -> int:
    """Bytes of one layer's K-FAC factors (input [D_in(+1)]² and output [D_out]²) and eigenbases."""
    d_a = d_in + int(has_bias)
    return 2 * itemsize * (d_a * d_a + d_out * d_out)


def select_layers(
    params: Params, patterns: str | Sequence[str] = DEFAULT_PRESET
) -> tuple[str, ...]:
    """Dotted paths of the linear layers matched by `patterns` (a preset name or regexes).

    Raises:
      InputError: if nothing matches (field `curvature.layers`).
    Warns:
      if a pattern selects the LM head (or any layer) whose factors would exceed 1 GiB.
    """
    if isinstance(patterns, str):
        patterns = LAYER_PRESETS.get(patterns, (patterns,))
    compiled = [re.compile(p) for p in patterns]
    all_layers = linear_layer_paths(params)
    chosen = tuple(path for path in all_layers if any(c.fullmatch(path) for c in compiled))
    if not chosen:
        raise InputError(
            f"layer patterns {list(patterns)} match no linear layer; available: "
            f"{sorted(all_layers)[:12]}{' ...' if len(all_layers) > 12 else ''}",
            field="curvature.layers",
        )
    adapters = [p for p in all_layers if p.startswith("lora.")]
    if adapters and any(not p.startswith("lora.") for p in chosen):
        # LoRA trains only the adapters: H over base weights would be over frozen parameters.
        raise InputError(
            f"these parameters carry LoRA adapters, but the patterns {list(patterns)} select "
            f"base weights ({[p for p in chosen if not p.startswith('lora.')][:3]}); select "
            "adapters (the preset 'lora', or regexes over 'lora.layers.N.<block>.<proj>.lora_a|b')",
            field="curvature.layers",
        )
    for path in chosen:
        d_in, d_out = all_layers[path]
        need = factor_bytes(d_in, d_out)
        if need > LARGE_FACTOR_BYTES or path.split(".")[-1] in ("lm_head", "embed_tokens"):
            warnings.warn(
                f"curvature layer {path!r} ([{d_in}, {d_out}]) needs {need / 2**30:.2f} GiB of "
                "K-FAC factors and eigenbases in f32; the paper excludes the LM head",
                stacklevel=2,
            )
    return chosen


def _get(params: Params, path: str) -> Any:
    node: Any = params
    for key in path.split("."):
        node = node[int(key)] if isinstance(node, (list, tuple)) else _lookup(node, key)
    return node


def _lookup(node: Mapping, key: str) -> Any:
    if key in node:
        return node[key]
    if key.isdigit() and int(key) in node:
        return node[int(key)]
    raise KeyError(key)


def split_params(params: Params, layers: Sequence[str]) -> tuple[dict[str, Any], Params]:
    """(selected, rest): selected = {path: layer dict}; rest = params (selected entries kept)."""
    selected = {path: dict(_get(params, path)) for path in layers}
    return selected, params


def merge_params(selected: Mapping[str, Any], rest: Params) -> Params:
    """A copy of `rest` with the layers in `selected` replaced (a pure function, jit-friendly)."""

    def replace(node: Any, prefix: tuple[str, ...]) -> Any:
        path = ".".join(prefix)
        if path in selected:
            return {**node, **selected[path]}
        if not any(p == path or p.startswith(path + ".") for p in selected) and prefix:
            return node
        if isinstance(node, Mapping):
            return {k: replace(v, (*prefix, str(k))) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(replace(v, (*prefix, str(i))) for i, v in enumerate(node))
        return node

    return replace(rest, ())


def layer_array(layer: Mapping[str, Any]) -> Any:
    """A layer's parameters as one [D_in(+1), D_out] array: kernel rows, then the bias row.

    This is kfac-jax's layout for a dense block (input factor over x with a trailing 1 for the
    bias).
    """
    import jax.numpy as jnp

    kernel_io = layer["kernel"]
    if layer.get("bias") is None:
        return kernel_io
    return jnp.concatenate([kernel_io, layer["bias"][None, :]], axis=0)


def layer_from_array(array_ao: Any, like: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `layer_array`, shaped like the layer dict `like`."""
    d_in = like["kernel"].shape[0]
    out = {"kernel": array_ao[:d_in]}
    if like.get("bias") is not None:
        out["bias"] = array_ao[d_in]
    return out
