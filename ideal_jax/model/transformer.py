"""A Llama / Qwen2 / Mistral decoder-only transformer in Flax NNX.

Modules are defined with NNX; everything outside this file sees parameters as a *pure nested dict*
(`init_params`) and calls the pure function `forward`. Parameter names mirror Hugging Face's so that
checkpoint conversion is a rename plus a transpose (kernels are [in, out]).

Shape letters: B batch, T query length, S key length, D model, F mlp hidden, H query heads,
K kv heads, G = H // K query heads per kv head, E head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ideal_jax import sharding
from ideal_jax.model.config import ModelConfig

Params = dict[str, Any]
# A large finite negative number instead of -inf: rows whose keys are all masked (padding queries)
# then give a uniform softmax instead of NaN, and padding queries never affect real tokens.
_MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class KfacTags:
    """Which linear layers register themselves with kfac-jax (see ideal_jax.curvature).

    `layers` holds dotted parameter paths such as "layers.0.mlp.gate_proj". Rows of `token_mask_bt`
    that are 0 (padding) are zeroed in the tagged input so they never enter the input factor.
    """

    layers: frozenset[str]
    token_mask_bt: jax.Array | None = None
    # LoRA adapters (ideal_jax/model/lora.py) riding along with the tags to every Linear:
    # {layer path: {"lora_a": {"kernel": [D_in, r]}, "lora_b": {"kernel": [r, D_out]}}} and the
    # scale alpha / r. An adapter is tagged for kfac-jax as "lora.<path>.lora_a" / ".lora_b".
    lora: Any = None
    lora_scale: Any = None
    # Capture mode (ideal_jax/curvature/captures.py): a ProbeCapture instead of kfac-jax's tags.
    capture: Any = None


jax.tree_util.register_dataclass(
    KfacTags,
    data_fields=["token_mask_bt", "lora", "lora_scale"],
    meta_fields=["layers", "capture"],
)


class ProbeCapture:
    """Capture mode of the tagged layers, for one trace of the forward: each tagged dense layer
    records its (masked) input rows [N, I] in `inputs[path]` and its output shape in
    `shapes[path]`, and adds `probes[path]` (zeros [N, O]) to its output, so that the gradient
    with respect to the probes is ∂L/∂y of every layer from one ordinary backward pass of the same
    forward that gave the inputs (probes None: record only, for jax.eval_shape)."""

    def __init__(self, probes: dict | None):
        self.probes = probes
        self.inputs: dict[str, jax.Array] = {}
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}


# The params key of the LoRA adapters: {"scale": [], "layers": {i: {"self_attn" | "mlp":
# {proj: {"lora_a": {"kernel"}, "lora_b": {"kernel"}}}}}} (ideal_jax/model/lora.py).
LORA_KEY = "lora"


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out], with optional kfac-jax dense registration."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        path: str,
        axes: tuple[str, str],
        use_bias: bool,
        init_std: float,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(init_std)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), jnp.float32), logical_axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((d_out,), jnp.float32), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        self.path = path

    def __call__(self, x: jax.Array, dtype, kfac_tags: KfacTags | None = None) -> jax.Array:
        kernel = self.kernel[...].astype(dtype)
        bias = None if self.bias is None else self.bias[...].astype(dtype)
        x = x.astype(dtype)
        if kfac_tags is not None and self.path in kfac_tags.layers:
            y = _tagged_dense(x, kernel, bias, kfac_tags, self.path)
        else:
            y = jnp.einsum("...D,DF->...F", x, kernel)
            y = y if bias is None else y + bias
        adapter = None if kfac_tags is None or kfac_tags.lora is None else kfac_tags.lora
        adapter = None if adapter is None else adapter.get(self.path)
        return y if adapter is None else y + self._lora(x, adapter, dtype, kfac_tags)

    def _lora(self, x, adapter, dtype, kfac_tags: KfacTags) -> jax.Array:
        """scale · (x A) B, each matmul tagged for kfac-jax when its adapter path is chosen."""
        name = f"{LORA_KEY}.{self.path}"
        a_dr = adapter["lora_a"]["kernel"].astype(dtype)
        b_rf = adapter["lora_b"]["kernel"].astype(dtype)
        if f"{name}.lora_a" in kfac_tags.layers:
            u = _tagged_dense(x, a_dr, None, kfac_tags, f"{name}.lora_a")
        else:
            u = jnp.einsum("...D,DR->...R", x, a_dr)
        if f"{name}.lora_b" in kfac_tags.layers:
            v = _tagged_dense(u, b_rf, None, kfac_tags, f"{name}.lora_b")
        else:
            v = jnp.einsum("...R,RF->...F", u, b_rf)
        return (kfac_tags.lora_scale.astype(dtype) * v).astype(dtype)


def _tagged_dense(x, kernel, bias, kfac_tags: KfacTags, path: str) -> jax.Array:

    lead_shape, d_in = x.shape[:-1], x.shape[-1]
    x_nd = x.reshape(-1, d_in)
    if kfac_tags.token_mask_bt is not None:
        mask_n1 = sharding.constrain_rows(kfac_tags.token_mask_bt.reshape(-1, 1))
        x_nd = x_nd * mask_n1.astype(x_nd.dtype)
    # Token rows over (data, fsdp) (inside sharding.activation_mesh): else XLA lays the tag's
    # inputs out like the row-sharded factors they feed and must replicate them to go back.
    x_nd = sharding.constrain_rows(x_nd)
    y_nf = sharding.constrain_rows(x_nd @ kernel)
    if bias is not None:
        y_nf = y_nf + bias
    capture = kfac_tags.capture
    if capture is not None:
        capture.inputs[path] = x_nd
        capture.shapes[path] = jax.ShapeDtypeStruct(y_nf.shape, y_nf.dtype)
        if capture.probes is not None:
            y_nf = y_nf + capture.probes[path].astype(y_nf.dtype)
    else:
        import kfac_jax  # curvature passes only; keeps the plain forward free of kfac-jax

        y_nf = kfac_jax.register_dense(y_nf, x_nd, kernel, bias)
    return y_nf.reshape(*lead_shape, kernel.shape[1])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * x32).astype(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> jax.Array:
    """[E/2] inverse frequencies, with Llama-3 frequency-dependent scaling when configured."""
    e = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x_bthe: jax.Array, positions_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in Hugging Face's half-split layout (rotate_half)."""
    angles_bte = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, E/2]
    angles_bte = jnp.concatenate([angles_bte, angles_bte], axis=-1)
    cos, sin = jnp.cos(angles_bte)[:, :, None, :], jnp.sin(angles_bte)[:, :, None, :]
    x32 = x_bthe.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x_bthe.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        d, h, k, e = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        std, bias = cfg.initializer_range, cfg.attention_bias
        p = f"layers.{layer}.self_attn"
        self.q_proj = Linear(
            d,
            h * e,
            path=f"{p}.q_proj",
            axes=("embed", "heads"),
            use_bias=bias,
            init_std=std,
            rngs=rngs,
        )
        self.k_proj = Linear(
            d,
            k * e,
            path=f"{p}.k_proj",
            axes=("embed", "kv_heads"),
            use_bias=bias,
            init_std=std,
            rngs=rngs,
        )
        self.v_proj = Linear(
            d,
            k * e,
            path=f"{p}.v_proj",
            axes=("embed", "kv_heads"),
            use_bias=bias,
            init_std=std,
            rngs=rngs,
        )
        self.o_proj = Linear(
            h * e,
            d,
            path=f"{p}.o_proj",
            axes=("heads", "embed"),
            use_bias=False,
            init_std=std,
            rngs=rngs,
        )

    def __call__(
        self, x_btd, positions_bt, q_segment_bt, q_index_bt, cache, cfg: ModelConfig, kfac_tags
    ):
        b, t, _ = x_btd.shape
        h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dtype = cfg.compute_dtype
        inv_freq = rope_inverse_frequencies(cfg)
        q_bthe = apply_rope(
            self.q_proj(x_btd, dtype, kfac_tags).reshape(b, t, h, e), positions_bt, inv_freq
        )
        k_btke = apply_rope(
            self.k_proj(x_btd, dtype, kfac_tags).reshape(b, t, k, e), positions_bt, inv_freq
        )
        v_btke = self.v_proj(x_btd, dtype, kfac_tags).reshape(b, t, k, e)
        if cache is None:
            k_bske, v_bske, k_segment_bs, k_index_bs = k_btke, v_btke, q_segment_bt, q_index_bt
            new_cache = None
        else:  # write this step's keys at cache["index"], then attend over the whole buffer
            start = cache["index"]
            k_bske = jax.lax.dynamic_update_slice(
                cache["k"], k_btke.astype(cache["k"].dtype), (0, start, 0, 0)
            )
            v_bske = jax.lax.dynamic_update_slice(
                cache["v"], v_btke.astype(cache["v"].dtype), (0, start, 0, 0)
            )
            k_segment_bs = jax.lax.dynamic_update_slice(cache["segment"], q_segment_bt, (0, start))
            s = k_bske.shape[1]
            k_index_bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            new_cache = {"k": k_bske, "v": v_bske, "segment": k_segment_bs, "index": start + t}
        g = h // k
        q_btkge = q_bthe.reshape(b, t, k, g, e)
        k_bske, v_bske = k_bske.astype(dtype), v_bske.astype(dtype)
        mask_bts = (
            (k_index_bs[:, None, :] <= q_index_bt[:, :, None])
            & (k_segment_bs[:, None, :] == q_segment_bt[:, :, None])
            & (k_segment_bs[:, None, :] != 0)
        )
        if cfg.sliding_window is not None:
            mask_bts &= (q_index_bt[:, :, None] - k_index_bs[:, None, :]) < cfg.sliding_window

        def attend(q0: int, q1: int, s1: int | None) -> jax.Array:
            """Query rows q0:q1 over key rows 0:s1 (the rest of their keys are all masked)."""
            scores_bkgts = jnp.einsum("BTKGE,BSKE->BKGTS", q_btkge[:, q0:q1], k_bske[:, :s1])
            scores_bkgts = scores_bkgts.astype(jnp.float32) / math.sqrt(e)
            mask = mask_bts[:, None, None, q0:q1, :s1]
            scores_bkgts = jnp.where(mask, scores_bkgts, _MASK_VALUE)
            probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(dtype)
            return jnp.einsum("BKGTS,BSKE->BTKGE", probs_bkgts, v_bske[:, :s1])

        out_btkge = jnp.concatenate(
            [attend(q0, q1, s1) for q0, q1, s1 in causal_blocks(t, cache is None)], axis=1
        )
        return self.o_proj(out_btkge.reshape(b, t, h * e), dtype, kfac_tags), new_cache


# Query rows per attention block when a row attends only to earlier rows (no KV cache). Rows of a
# block never see keys past the block's last row (causal, and packed segments only look back), so
# each block's scores stop there: at T = 512 the attention computes 10 of the 16 [128 × 128] tiles
# (benchmarks/bench_attention_blocks.py measures it). The result equals the full masked softmax:
# a skipped key's weight is exactly 0 there.
ATTENTION_BLOCK = 128


def causal_blocks(
    t: int, causal: bool, block: int | None = None
) -> list[tuple[int, int, int | None]]:
    """[(first query row, end query row, end key row)] covering the T query rows: one block over
    all keys (end key row None: a KV cache's keys outnumber the queries) unless `causal` and T
    exceeds `block` (default ATTENTION_BLOCK)."""
    block = ATTENTION_BLOCK if block is None else block
    if not causal or t <= block:
        return [(0, t, None)]
    return [(q0, min(t, q0 + block), min(t, q0 + block)) for q0 in range(0, t, block)]


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        p = f"layers.{layer}.mlp"
        self.gate_proj = Linear(
            d,
            f,
            path=f"{p}.gate_proj",
            axes=("embed", "mlp"),
            use_bias=False,
            init_std=std,
            rngs=rngs,
        )
        self.up_proj = Linear(
            d,
            f,
            path=f"{p}.up_proj",
            axes=("embed", "mlp"),
            use_bias=False,
            init_std=std,
            rngs=rngs,
        )
        self.down_proj = Linear(
            f,
            d,
            path=f"{p}.down_proj",
            axes=("mlp", "embed"),
            use_bias=False,
            init_std=std,
            rngs=rngs,
        )

    def __call__(self, x_btd, cfg: ModelConfig, kfac_tags):
        dtype = cfg.compute_dtype
        h_btf = jax.nn.silu(self.gate_proj(x_btd, dtype, kfac_tags)) * self.up_proj(
            x_btd, dtype, kfac_tags
        )
        return self.down_proj(h_btf, dtype, kfac_tags)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer, rngs)

    def __call__(self, x_btd, positions_bt, segment_bt, index_bt, cache, cfg, kfac_tags):
        attn_btd, new_cache = self.self_attn(
            self.input_layernorm(x_btd), positions_bt, segment_bt, index_bt, cache, cfg, kfac_tags
        )
        x_btd = x_btd + attn_btd
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd), cfg, kfac_tags)
        return x_btd, new_cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Param(
            init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32),
            logical_axes=("vocab", "embed"),
        )
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                path="lm_head",
                axes=("embed", "vocab"),
                use_bias=False,
                init_std=cfg.initializer_range,
                rngs=rngs,
            )


@functools.lru_cache(maxsize=32)
def _graphdef_and_abstract_state(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters as a pure nested dict (jit this with out_shardings)."""
    model = Transformer(cfg, nnx.Rngs(params=rng))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter, in the same nested-dict structure as params."""
    _, state = _graphdef_and_abstract_state(cfg)
    axes = jax.tree.map(
        lambda v: v.get_metadata()["logical_axes"],
        state,
        is_leaf=lambda v: isinstance(v, nnx.Variable),
    )
    return nnx.to_pure_dict(axes)


def _bind(cfg: ModelConfig, params: Params) -> Transformer:
    graphdef, abstract_state = _graphdef_and_abstract_state(cfg)
    state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy we may fill in
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _with_lora(params: Params, kfac_tags: KfacTags | None) -> tuple[Params, KfacTags]:
    """(the base parameters, tags carrying the adapters of params[LORA_KEY] and their scale)."""
    lora = params[LORA_KEY]
    base = {k: v for k, v in params.items() if k != LORA_KEY}
    adapters = {}
    for i, layer in lora["layers"].items():
        for block, projections in layer.items():
            for name, adapter in projections.items():
                adapters[f"layers.{i}.{block}.{name}"] = adapter
    tags = kfac_tags if kfac_tags is not None else KfacTags(frozenset())
    return base, dataclasses.replace(tags, lora=adapters, lora_scale=lora["scale"])


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens_bt: jax.Array,
    positions_bt: jax.Array | None = None,
    segment_ids_bt: jax.Array | None = None,
    *,
    kfac_tags: KfacTags | None = None,
    cache: list | None = None,
    num_layers: int | None = None,
    return_hidden: bool = False,
    start_layer: int = 0,
    hidden_btd: jax.Array | None = None,
    head_positions_bk: jax.Array | None = None,
):
    """Logits [B, T, V] in float32 (and the updated KV cache when `cache` is given).

    segment_ids: 0 marks padding; attention never crosses segments (packed sequences).
    params[LORA_KEY] (optional): LoRA adapters added to their projections (ideal_jax/model/lora.py).
    cache: per-layer dicts from `ideal_jax.model.decoding.init_cache`; the query indices are then
      cache positions, not 0..T-1.
    num_layers / return_hidden: stop after the first `num_layers` decoder layers and return the
      hidden state [B, T, D] instead of logits (DaaR's shallow features).
    start_layer / hidden_btd: start at decoder layer `start_layer` from `hidden_btd`, the hidden
      state that `forward(..., num_layers=start_layer, return_hidden=True)` returned for these
      tokens (the curvature passes reuse the layers below their lowest tagged one).
    """
    if (hidden_btd is None) != (start_layer == 0) or (start_layer and cache is not None):
        raise ValueError("start_layer > 0 needs hidden_btd (and no KV cache), and only then")
    if LORA_KEY in params:  # LoRA adapters (model/lora.py) ride along with the tags
        params, kfac_tags = _with_lora(params, kfac_tags)
    model = _bind(cfg, params)
    b, t = tokens_bt.shape
    if segment_ids_bt is None:
        segment_ids_bt = jnp.ones((b, t), jnp.int32)
    if positions_bt is None:
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if cache is None:
        index_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
        index_bt = cache[0]["index"] + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    dtype = cfg.compute_dtype
    # Inside sharding.activation_mesh (sharding.py says why): the table gathered over fsdp first
    # (vocab stays over tensor), so the lookup yields rows over (data, fsdp), not D over fsdp.
    if hidden_btd is None:
        table_vd = sharding.constrain_spec(model.embed_tokens[...], ("vocab", None))
        x_btd = sharding.constrain_rows(jnp.take(table_vd, tokens_bt, axis=0).astype(dtype))
    else:
        x_btd = sharding.constrain_rows(hidden_btd.astype(dtype))
    new_caches = []
    end = num_layers if num_layers is not None else cfg.num_layers
    layers = list(model.layers)[start_layer:end]
    for i, layer in enumerate(layers):
        layer_cache = None if cache is None else cache[i]

        def run(layer, x, layer_cache=layer_cache):
            return layer(x, positions_bt, segment_ids_bt, index_bt, layer_cache, cfg, kfac_tags)

        if cfg.remat and cache is None:
            run = nnx.remat(run)
        x_btd, layer_cache = run(layer, x_btd)
        x_btd = sharding.constrain_rows(x_btd)
        new_caches.append(layer_cache)
    if return_hidden:
        return x_btd.astype(jnp.float32)
    if head_positions_bk is not None:
        x_btd = jnp.take_along_axis(x_btd, head_positions_bk[..., None], axis=1)  # [B, K, D]
    x_btd = model.norm(x_btd)
    if cfg.tie_word_embeddings:
        logits_btv = jnp.einsum("BTD,VD->BTV", x_btd, model.embed_tokens[...].astype(dtype))
    else:
        logits_btv = model.lm_head(x_btd, dtype, kfac_tags)
    logits_btv = logits_btv.astype(jnp.float32)
    return logits_btv if cache is None else (logits_btv, new_caches)


def token_losses(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Per-token cross-entropy [B, T] in float32."""
    log_probs_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs_btv, targets_bt[..., None], axis=-1)[..., 0]


def input_embeddings(cfg: ModelConfig, params: Params, tokens_bt: jax.Array) -> jax.Array:
    """The base model's input embeddings [B, T, D] (DaaR centroids)."""
    return jnp.take(params["embed_tokens"], tokens_bt, axis=0).astype(jnp.float32)
