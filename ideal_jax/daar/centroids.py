"""Text embeddings for DaaR: padding-masked token means of the base model's representations.

Two representations of one text share the same batched, jitted path (`embed_token_lists`):
  * "input":  token-mean of the input embeddings (METHOD.md §2.1: the domain centroids and the
    pseudo-labelling space, also the similarity used to accept generated pairs);
  * "hidden": token-mean of the hidden state after the first `layer` decoder layers (§2.3: the probe
    features f(x)); with final_norm=True each token's state first goes through the base model's
    final RMSNorm, as in the public code (a model truncated to its first layers still applies its
    final norm to the last hidden state).
Padding is masked out of every mean (the public DaaR code averaged over padding too, so a text's
embedding depended on the length of the longest text in its batch).

Texts are tokenized without special tokens: a BOS shared by every text would add the same vector to
every mean and push all cosine similarities towards 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ideal_jax import sharding
from ideal_jax.data.records import Example
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.decoding import bucket
from ideal_jax.model.transformer import Params, forward, input_embeddings

SOURCES = ("input", "hidden")


def example_text(example: Example) -> str:
    """The text DaaR embeds for a pool / probe example: every prompt turn, then the response."""
    return "\n".join([content for _, content in example.messages] + [example.response])


def pair_text(instruction: str, response: str) -> str:
    """The text embedded for a generated (instruction, response) pair; matches `example_text`."""
    return f"{instruction}\n{response}"


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Token ids per text (no special tokens), truncated to the first `max_len` tokens."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(row)[:max_len] for row in ids]


def final_norm(cfg: ModelConfig, params: Params, x_btd: jax.Array) -> jax.Array:
    """The base model's final RMSNorm (`Transformer.norm`) applied to hidden states."""
    x_btd = x_btd.astype(jnp.float32)
    x_btd = x_btd * jax.lax.rsqrt(
        jnp.mean(x_btd * x_btd, axis=-1, keepdims=True) + cfg.rms_norm_eps
    )
    return params["norm"]["scale"].astype(jnp.float32) * x_btd


@functools.partial(jax.jit, static_argnames=("cfg", "source", "layer", "normed"))
def mean_pool(
    cfg: ModelConfig,
    params: Params,
    tokens_bt: jax.Array,
    mask_bt: jax.Array,
    *,
    source: str,
    layer: int,
    normed: bool = False,
) -> jax.Array:
    """[B, D] token-mean of the chosen representation over the unmasked (non-padding) tokens."""
    if source == "input":
        x_btd = input_embeddings(cfg, params, tokens_bt)
    else:
        segment_bt = mask_bt.astype(jnp.int32)  # 0 = padding: never attended to
        positions_bt = jnp.maximum(jnp.cumsum(segment_bt, axis=1) - 1, 0)
        x_btd = forward(
            cfg, params, tokens_bt, positions_bt, segment_bt, num_layers=layer, return_hidden=True
        )
        if normed:
            x_btd = final_norm(cfg, params, x_btd)
    m_bt1 = mask_bt.astype(jnp.float32)[..., None]
    # An all-padding row (an empty text, or a filler row) gives 0 rather than NaN.
    return jnp.sum(x_btd * m_bt1, axis=1) / jnp.maximum(jnp.sum(m_bt1, axis=1), 1.0)


def embed_token_lists(
    cfg: ModelConfig,
    params: Params,
    token_lists: Sequence[Sequence[int]],
    *,
    source: str = "input",
    layer: int = 0,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    pad_id: int = 0,
    normed: bool = False,
) -> np.ndarray:
    """[N, D] float32 embeddings of token lists, in input order.

    Sequences are sorted by length so each batch pads little; every batch has `batch_size` rows
    (filled with empty rows) and a power-of-two length (at least 32), so only a handful of shapes
    compile, even when generation embeds one pair at a time.
    With a mesh, batch rows are sharded over its batch axes (data x fsdp). normed: the final
    RMSNorm on each token of a "hidden" representation before the mean.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "hidden" and not 1 <= layer <= cfg.num_layers:
        raise ValueError(f"layer must be in 1..{cfg.num_layers} for hidden features, got {layer}")
    n = len(token_lists)
    if n == 0:
        return np.zeros((0, cfg.hidden_size), np.float32)
    divisor = sharding.batch_divisor(mesh) if mesh is not None else 1
    rows = -(-max(1, batch_size) // divisor) * divisor
    lengths = np.array([len(t) for t in token_lists])
    order = np.argsort(lengths, kind="stable")
    out_nd = np.zeros((n, cfg.hidden_size), np.float32)
    for start in range(0, n, rows):
        idx = order[start : start + rows]
        t = bucket(int(lengths[idx].max()), minimum=32)
        tokens_bt = np.full((rows, t), pad_id, np.int32)
        mask_bt = np.zeros((rows, t), bool)
        for r, i in enumerate(idx):
            seq = token_lists[i]
            tokens_bt[r, : len(seq)] = seq
            mask_bt[r, : len(seq)] = True
        batch = {"tokens": tokens_bt, "mask": mask_bt}
        if mesh is not None:
            batch = sharding.shard_batch(batch, mesh)
        pooled_bd = mean_pool(
            cfg,
            params,
            batch["tokens"],
            batch["mask"],
            source=source,
            layer=int(layer),
            normed=bool(normed) and source == "hidden",
        )
        out_nd[idx] = np.asarray(pooled_bd)[: len(idx)]
    return out_nd


def embed_texts(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    source: str = "input",
    layer: int = 0,
    max_len: int = 256,
    batch_size: int = 64,
    mesh: Mesh | None = None,
    normed: bool = False,
) -> np.ndarray:
    """[N, D] embeddings of raw texts (see `embed_token_lists`)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return embed_token_lists(
        cfg,
        params,
        tokenize_texts(tokenizer, texts, max_len),
        source=source,
        layer=layer,
        batch_size=batch_size,
        mesh=mesh,
        pad_id=pad_id,
        normed=normed,
    )


def domain_centroids(embeddings_by_domain: Sequence[np.ndarray]) -> np.ndarray:
    """[K, D] centroid per domain: C_k = mean of its accepted pairs' embeddings."""
    centroids = []
    for k, emb_nd in enumerate(embeddings_by_domain):
        if len(emb_nd) == 0:
            raise ValueError(f"domain {k} has no accepted pairs: its centroid is undefined")
        centroids.append(np.asarray(emb_nd, np.float32).mean(axis=0))
    return np.stack(centroids)


def cosine_similarity(a_nd: np.ndarray, b_md: np.ndarray) -> np.ndarray:
    """[N, M] cosine similarities (a zero vector has similarity 0 to everything)."""
    a = np.asarray(a_nd, np.float64)
    b = np.asarray(b_md, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


@dataclasses.dataclass(frozen=True)
class Embedder:
    """The two DaaR representations of texts / examples with one model and one set of settings."""

    model_cfg: ModelConfig
    params: Params
    tokenizer: Any
    mesh: Mesh | None = None
    max_len: int = 256
    batch_size: int = 64
    centroid_source: str = "input"  # METHOD.md §2.1: input embeddings
    centroid_layer: int = 0  # for centroid_source="hidden"
    feature_layer: int = 3  # probe features: hidden state after this many decoder layers
    feature_norm: bool = False  # the final RMSNorm on the probe features' tokens (public code)

    def texts(
        self, texts: Sequence[str], source: str, layer: int, normed: bool = False
    ) -> np.ndarray:
        return embed_texts(
            self.model_cfg,
            self.params,
            self.tokenizer,
            texts,
            source=source,
            layer=layer,
            max_len=self.max_len,
            batch_size=self.batch_size,
            mesh=self.mesh,
            normed=normed,
        )

    def centroid_space(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] embeddings used for centroids, pair similarity and k-means."""
        return self.texts(texts, self.centroid_source, self.centroid_layer)

    def features(self, examples: Sequence[Example]) -> np.ndarray:
        """[N, D] probe features f(x) of examples."""
        texts = [example_text(ex) for ex in examples]
        return self.texts(texts, "hidden", self.feature_layer, self.feature_norm)
