"""LoRA adapters (Hu et al. 2021) on the decoder's projections: init, sharding axes, merging.

The adapters live in the parameter tree under `params["lora"]` (transformer.LORA_KEY):

    {"scale": f32 [] = alpha / r,
     "layers": {i: {"self_attn" | "mlp": {proj: {"lora_a": {"kernel": [D_in, r]},
                                                 "lora_b": {"kernel": [r, D_out]}}}}}}

`transformer.forward` adds scale · (x A) B to each adapted projection's output, so every stage that
runs the model (training, evaluation, decoding, curvature passes) sees the adapted model. A is
initialised as PEFT does (Kaiming-uniform, bound 1/sqrt(D_in)), B as zeros: a fresh adapter leaves
the model's outputs unchanged. The exported Hugging Face model carries the adapters merged into the
base weights (W + scale · A B), not a PEFT adapter directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import LORA_KEY, abstract_params, logical_axes

# Every projection an adapter can sit on, and the block that holds it.
PROJECTIONS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def parse_targets(value: str | Sequence[str]) -> tuple[str, ...]:
    """ "all" | comma-separated names ("q_proj,v_proj"; "q" is short for "q_proj") → names.

    Unknown names are returned as given: `unknown_targets` reports them."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return tuple(PROJECTIONS)
    return tuple(
        n if n in PROJECTIONS or f"{n}_proj" not in PROJECTIONS else f"{n}_proj" for n in names
    )


def unknown_targets(targets: Sequence[str]) -> list[str]:
    return [t for t in targets if t not in PROJECTIONS]


def _base_kernel(tree: Any, layer: int, block: str, name: str) -> Any:
    return tree["layers"][layer][block][name]["kernel"]


def abstract_adapters(model_cfg: ModelConfig, targets: Sequence[str], rank: int) -> dict:
    """Shapes of the adapter tree (params[LORA_KEY])."""
    base = abstract_params(model_cfg)
    layers = {}
    for i in range(model_cfg.num_layers):
        blocks: dict[str, dict] = {}
        for name in targets:
            block = PROJECTIONS[name]
            d_in, d_out = _base_kernel(base, i, block, name).shape
            blocks.setdefault(block, {})[name] = {
                "lora_a": {"kernel": jax.ShapeDtypeStruct((d_in, rank), jnp.float32)},
                "lora_b": {"kernel": jax.ShapeDtypeStruct((rank, d_out), jnp.float32)},
            }
        layers[i] = blocks
    return {"scale": jax.ShapeDtypeStruct((), jnp.float32), "layers": layers}


def init_adapters(
    model_cfg: ModelConfig, targets: Sequence[str], rank: int, alpha: float, key: jax.Array
) -> dict:
    """A ~ U(-1/sqrt(D_in), 1/sqrt(D_in)) (PEFT's Kaiming-uniform with a = sqrt(5)), B = 0."""
    shapes = abstract_adapters(model_cfg, targets, rank)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes["layers"])
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        if getattr(path[-2], "key", None) == "lora_a":
            bound = 1.0 / np.sqrt(shape.shape[0])
            out.append(jax.random.uniform(k, shape.shape, jnp.float32, -bound, bound))
        else:
            out.append(jnp.zeros(shape.shape, jnp.float32))
    layers = jax.tree_util.tree_unflatten(treedef, out)
    return {"scale": jnp.asarray(float(alpha) / int(rank), jnp.float32), "layers": layers}


def adapter_logical_axes(model_cfg: ModelConfig, targets: Sequence[str]) -> dict:
    """Logical axes of the adapter tree: A [in-axis of W, None], B [None, out-axis of W]."""
    base = logical_axes(model_cfg)
    layers = {}
    for i in range(model_cfg.num_layers):
        blocks: dict[str, dict] = {}
        for name in targets:
            block = PROJECTIONS[name]
            in_axis, out_axis = _base_kernel(base, i, block, name)
            blocks.setdefault(block, {})[name] = {
                "lora_a": {"kernel": (in_axis, None)},
                "lora_b": {"kernel": (None, out_axis)},
            }
        layers[i] = blocks
    return {"scale": (), "layers": layers}


def merge(params: Mapping) -> dict:
    """The base parameters with every adapter merged in (W + scale · A B, float32); `params`
    itself (as a dict) when it holds no adapters. Works on device (jit) and host arrays."""
    if LORA_KEY not in params:
        return dict(params)
    lora = params[LORA_KEY]
    scale = lora["scale"]
    out = {k: v for k, v in params.items() if k != LORA_KEY}
    layers = dict(out["layers"]) if isinstance(out["layers"], Mapping) else list(out["layers"])
    for i, blocks in _items(lora["layers"]):
        idx = _layer_index(layers, i)
        layer = dict(layers[idx])
        for block, projections in blocks.items():
            block_params = dict(layer[block])
            for name, adapter in projections.items():
                proj = dict(block_params[name])
                delta = adapter["lora_a"]["kernel"] @ adapter["lora_b"]["kernel"]
                proj["kernel"] = proj["kernel"] + scale * delta
                block_params[name] = proj
            layer[block] = block_params
        layers[idx] = layer
    out["layers"] = layers
    return out


def _items(node: Any):
    return node.items() if isinstance(node, Mapping) else enumerate(node)


def _layer_index(layers: Any, i: Any) -> Any:
    """The key of layer i in `layers` (int or str keys: orbax may restore either)."""
    if isinstance(layers, list):
        return int(i)
    for key in (i, int(i), str(i)):
        if key in layers:
            return key
    raise KeyError(i)


def merge_host(params: Mapping) -> dict:
    """`merge` in float64 on the host (numpy), cast back to float32: the exported weights."""
    if LORA_KEY not in params:
        return dict(params)
    as64 = jax.tree.map(lambda x: np.asarray(x, np.float64), dict(params))
    return jax.tree.map(lambda x: np.asarray(x, np.float32), merge(as64))
