"""Our parameters in Hugging Face's layout: each tensor's name and where it sits in the param
tree (shared by the safetensors reader and writer, hf_io.py, and the GGUF reader, gguf_io.py)."""

from __future__ import annotations

from typing import Any

from ideal_jax.model.config import ModelConfig


def hf_tensor_names(cfg: ModelConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (path into our params, transpose?)."""
    names: dict[str, tuple[tuple, bool]] = {
        "model.embed_tokens.weight": (("embed_tokens",), False),
        "model.norm.weight": (("norm", "scale"), False),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{pre}.{norm}.weight"] = (("layers", i, norm, "scale"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{pre}.self_attn.{proj}.weight"] = (
                ("layers", i, "self_attn", proj, "kernel"),
                True,
            )
            if cfg.attention_bias and proj != "o_proj":
                names[f"{pre}.self_attn.{proj}.bias"] = (
                    ("layers", i, "self_attn", proj, "bias"),
                    False,
                )
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"{pre}.mlp.{proj}.weight"] = (("layers", i, "mlp", proj, "kernel"), True)
    return names


def tree_get(tree, path: tuple) -> Any:
    """The leaf at `path` (keys and list indices) of a nested param tree."""
    for key in path:
        tree = tree[key]
    return tree


def tree_set(tree, path: tuple, value) -> None:
    """Set the leaf at `path` of a nested param tree."""
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value
