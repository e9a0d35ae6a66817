"""Model hyper-parameters for the Llama / Qwen2 / Mistral family of decoder-only LMs.

`ModelConfig` is a frozen dataclass (hashable, so it can be a static jit argument) built either from
an ml_collections section (`from_config_dict`) or from a Hugging Face `config.json`
(`ideal_jax.model.hf_io.load_hf_config`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (names follow Hugging Face's)."""

    architecture: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64  # D
    intermediate_size: int = 256  # F
    num_layers: int = 2
    num_heads: int = 4  # H
    num_kv_heads: int = 2  # K (grouped-query attention when K < H)
    head_dim: int = 16  # E
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    sliding_window: int | None = None  # Mistral
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Compute dtype: parameters always stay float32 (master weights); activations/matmuls use this.
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (embedding and LM head counted once each unless tied)."""
        d, f, h, k, e, v = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        )
        attn = d * h * e * 2 + d * k * e * 2 + (h * e + 2 * k * e if self.attention_bias else 0)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), incl. attention scores."""
        non_embedding = self.num_params() - self.vocab_size * self.hidden_size
        if self.tie_word_embeddings:  # the tied head still costs a matmul
            non_embedding += self.vocab_size * self.hidden_size
        attention = 2 * self.num_layers * seq_len * self.num_heads * self.head_dim
        return 6.0 * non_embedding + 6.0 * attention

    @classmethod
    def from_config_dict(cls, section: Any) -> ModelConfig:
        """Build from an ml_collections `cfg.model` section (extra keys such as `path` ignored)."""
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        fields = {f.name for f in dataclasses.fields(cls)}
        rope = values.get("rope_scaling")
        if rope:
            values["rope_scaling"] = RopeScaling(**dict(rope))
        else:
            values["rope_scaling"] = None
        return cls(**{k: v for k, v in values.items() if k in fields})


def preset(name: str, vocab_size: int) -> ModelConfig:
    """Named shapes used by configs, tests and benchmarks."""
    shapes = {
        # ~0.2M parameters: the demo and unit tests.
        "tiny": dict(
            hidden_size=64,
            intermediate_size=192,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
        ),
        "small": dict(
            hidden_size=256,
            intermediate_size=768,
            num_layers=4,
            num_heads=8,
            num_kv_heads=4,
            head_dim=32,
        ),
        # ~1.1B, Llama-shaped (TinyLlama-like): GPU benchmarks.
        "1b": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_layers=22,
            num_heads=32,
            num_kv_heads=4,
            head_dim=64,
            rope_theta=500000.0,
        ),
        "llama3_8b": dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            rope_scaling=RopeScaling(),
            max_position_embeddings=131072,
        ),
    }
    if name not in shapes:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(shapes)}")
    return ModelConfig(vocab_size=vocab_size, **shapes[name])
