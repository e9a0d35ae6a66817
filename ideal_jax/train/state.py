"""The training state pytree, the optimizer, and sharded initialization.

`TrainState` is a flax.struct dataclass (a pytree): one optimizer update = one `step`. Parameters
are the model's pure nested dict in float32 (master weights); the compute dtype is the model
config's business. Gradient accumulation is NOT in the optimizer: `ideal_jax.train.step` scans over
`grad_accum` microbatches inside one step, so one `train_step` call = one optimizer update and
`step` counts updates.

The state is born sharded: `eval_shape` gives the abstract state, `state_shardings` maps parameter
logical axes to the mesh (Adam moments follow their parameter), and a jitted init with
`out_shardings` materialises it (or reshards given parameters, e.g. a Hugging Face base model).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ideal_jax import sharding
from ideal_jax.model import lora as lora_lib
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import LORA_KEY, abstract_params, init_params, logical_axes
from ideal_jax.train.finetuning import Finetuning
from ideal_jax.utils.errors import InputError

SCHEDULES = ("cosine", "linear", "constant")


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from one update to the next.

    step: int32 number of optimizer updates applied so far.
    params: pure nested dict of float32 parameters (with LoRA: the base model and params["lora"]).
    opt_state: optax state over the trainable parameters only (`Finetuning.trainable`: all of
      them, the top N decoder layers, or the LoRA adapters); Adam moments are sharded like their
      parameters.
    rng: uint32 [2] raw PRNG key data (saved with checkpoints; reserved for dropout / sampling).
    nonfinite_step: int32, -1 while every update so far had a finite loss and gradient; otherwise
      the `step` at which the first non-finite one was met. Once set, updates are no longer
      applied, so the state stays at the last good parameters until the host notices.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_step: jax.Array


def learning_rate_schedule(train_cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine / linear decay to `end_lr_fraction` of it."""
    peak = float(train_cfg.learning_rate)
    warmup = int(train_cfg.warmup_steps)
    end = peak * float(train_cfg.end_lr_fraction)
    name = str(train_cfg.schedule)
    if name not in SCHEDULES:
        known = ", ".join(SCHEDULES)
        raise InputError(f"unknown schedule {name!r}; known: {known}", field="train.schedule")
    decay_steps = max(int(total_steps) - warmup, 1)
    if name == "constant":
        decay = optax.constant_schedule(peak)
    elif name == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    else:
        decay = optax.linear_schedule(peak, end, decay_steps)
    if warmup <= 0:
        return decay
    # Warmup starts at peak / warmup rather than 0 so that the very first update is not a no-op.
    ramp = optax.linear_schedule(peak / warmup, peak, warmup - 1) if warmup > 1 else None
    if ramp is None:
        return optax.join_schedules([optax.constant_schedule(peak), decay], [warmup])
    return optax.join_schedules([ramp, decay], [warmup])


def weight_decay_mask(params: Any, *, decay_embeddings: bool = False) -> Any:
    """True for parameters that get weight decay: matrices only (norm scales and biases are
    vectors), and the token embedding only when asked (decaying rare-token rows hurts)."""

    def decide(path, leaf) -> bool:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "embed_tokens" in names and not decay_embeddings:
            return False
        return np.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(train_cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the configured schedule.

    The learning rate is an injected hyper-parameter so that train_step can report the rate it
    used (`optax.tree_utils.tree_get(opt_state, "learning_rate")`) without knowing the schedule.
    """
    decay_embeddings = bool(getattr(train_cfg, "decay_embeddings", False))
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=learning_rate_schedule(train_cfg, total_steps),
        b1=float(train_cfg.b1),
        b2=float(train_cfg.b2),
        weight_decay=float(train_cfg.weight_decay),
        mask=lambda p: weight_decay_mask(p, decay_embeddings=decay_embeddings),
    )
    clip = float(train_cfg.grad_clip)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def _build_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    finetuning: Finetuning | None = None,
):
    trainable = params if finetuning is None else finetuning.trainable(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(trainable),
        rng=rng,
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def _raw_key(rng: jax.Array) -> jax.Array:
    """uint32 key data: typed keys do not round-trip through checkpoints."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return jnp.asarray(rng, jnp.uint32)


def abstract_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    finetuning: Finetuning | None = None,
):
    """Shapes and dtypes of the TrainState, without allocating it."""
    return jax.eval_shape(
        lambda: _build_state(
            abstract_zeros(model_cfg, finetuning),
            optimizer,
            jnp.zeros((2,), jnp.uint32),
            finetuning,
        )
    )


def abstract_all_params(model_cfg: ModelConfig, finetuning: Finetuning | None = None) -> Any:
    """Shapes of the whole parameter tree: the model's, plus params["lora"] for LoRA."""
    shapes = abstract_params(model_cfg)
    if finetuning is not None and finetuning.kind == "lora":
        adapters = lora_lib.abstract_adapters(model_cfg, finetuning.targets, finetuning.rank)
        shapes = {**shapes, LORA_KEY: adapters}
    return shapes


def all_logical_axes(model_cfg: ModelConfig, finetuning: Finetuning | None = None) -> Any:
    axes = logical_axes(model_cfg)
    if finetuning is not None and finetuning.kind == "lora":
        axes = {**axes, LORA_KEY: lora_lib.adapter_logical_axes(model_cfg, finetuning.targets)}
    return axes


def abstract_zeros(model_cfg: ModelConfig, finetuning: Finetuning | None = None) -> Any:
    return jax.tree.map(
        lambda a: jnp.zeros(a.shape, a.dtype), abstract_all_params(model_cfg, finetuning)
    )


def state_shardings(
    abstract_state: TrainState,
    model_cfg: ModelConfig,
    mesh: Mesh,
    finetuning: Finetuning | None = None,
) -> TrainState:
    """NamedShardings for every leaf: params by logical axes, optimizer leaves that mirror a
    parameter (Adam's mu / nu) like that parameter, everything else (counts, scalars) replicated."""
    axes = all_logical_axes(model_cfg, finetuning)
    param_sh = sharding.param_shardings(abstract_state.params, axes, mesh)
    by_path = {}
    for path, (leaf, sh) in _flatten_with_keystr(abstract_state.params, param_sh):
        by_path[path] = (leaf.shape, sh)
    replicated = sharding.replicated(mesh)

    def for_opt_leaf(path, leaf):
        # The optimizer state nests param-shaped trees under its own keys: match on path suffix.
        for start in range(len(path)):
            hit = by_path.get(jax.tree_util.keystr(tuple(path[start:])))
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    opt_sh = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state)
    return TrainState(
        step=replicated,
        params=param_sh,
        opt_state=opt_sh,
        rng=replicated,
        nonfinite_step=replicated,
    )


def _flatten_with_keystr(tree: Any, shardings: Any):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    sh_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return [(jax.tree_util.keystr(p), (leaf, sh)) for (p, leaf), sh in zip(leaves, sh_leaves)]


def check_param_shapes(params: Any, model_cfg: ModelConfig, *, source: str) -> None:
    """InputError naming `source` and the first parameter whose shape disagrees with the config."""
    expected = dict(jax.tree_util.tree_flatten_with_path(abstract_params(model_cfg))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    exp_names = {jax.tree_util.keystr(k): v for k, v in expected.items()}
    got_names = {jax.tree_util.keystr(k): v for k, v in got.items()}
    for name, want in exp_names.items():
        if name not in got_names:
            raise InputError("parameter missing", path=source, field=name)
        shape = tuple(np.shape(got_names[name]))
        if shape != tuple(want.shape):
            raise InputError(
                f"parameter shape {shape} does not match the model config's {tuple(want.shape)}",
                path=source,
                field=name,
            )
    extra = sorted(set(got_names) - set(exp_names))
    if extra:
        raise InputError("parameter not in the model config", path=source, field=extra[0])


def init_train_state(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rng_or_params: jax.Array | Any,
    *,
    rng: jax.Array | None = None,
    finetuning: Finetuning | None = None,
    lora_key: jax.Array | None = None,
) -> tuple[TrainState, TrainState]:
    """A sharded TrainState at step 0 and its shardings.

    rng_or_params: a PRNG key (fresh random parameters, initialised directly into their shards)
      or a params dict (e.g. a Hugging Face base model, host or device arrays), which is checked
      against the config and resharded.
    rng: the state's own key; defaults to a fold of the init key (or key 0 for given params).
    finetuning: which parameters train (None: all); with LoRA, fresh adapters from `lora_key`
      (default key 0) are added as params["lora"].
    """
    abstract = abstract_train_state(model_cfg, optimizer, finetuning)
    shardings = state_shardings(abstract, model_cfg, mesh, finetuning)
    if finetuning is not None and finetuning.kind == "lora":
        return _init_lora_state(
            model_cfg, optimizer, mesh, rng_or_params, rng, finetuning, lora_key, shardings
        )
    is_key = isinstance(rng_or_params, jax.Array) and (
        jnp.issubdtype(rng_or_params.dtype, jax.dtypes.prng_key)
        or (rng_or_params.dtype == jnp.uint32 and rng_or_params.shape == (2,))
    )
    if is_key:
        init_key = rng_or_params
        if not jnp.issubdtype(init_key.dtype, jax.dtypes.prng_key):
            init_key = jax.random.wrap_key_data(init_key)
        state_key = _raw_key(rng if rng is not None else jax.random.fold_in(init_key, 1))

        def init_fn(key, state_key):
            return _build_state(init_params(model_cfg, key), optimizer, state_key, finetuning)

        state = jax.jit(init_fn, out_shardings=shardings)(init_key, state_key)
        return state, shardings
    params = rng_or_params
    check_param_shapes(params, model_cfg, source="init_params")
    # Cast on the host (numpy) or in place (jax): never gather a whole model onto one device.
    params = jax.tree.map(
        lambda x: x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, np.float32),
        params,
    )
    params = jax.device_put(params, shardings.params)
    state_key = _raw_key(rng if rng is not None else jax.random.key(0))
    build = jax.jit(lambda p, k: _build_state(p, optimizer, k, finetuning), out_shardings=shardings)
    return build(params, state_key), shardings


def _init_lora_state(model_cfg, optimizer, mesh, rng_or_params, rng, finetuning, lora_key, sh):
    """LoRA: the base model's parameters (given, or random from the key) plus fresh adapters."""
    base_sh = {k: v for k, v in sh.params.items() if k != LORA_KEY}
    if _is_key(rng_or_params):
        init_key = _typed_key(rng_or_params)
        state_key = _raw_key(rng if rng is not None else jax.random.fold_in(init_key, 1))
        params = jax.jit(lambda k: init_params(model_cfg, k), out_shardings=base_sh)(init_key)
    else:
        check_param_shapes(rng_or_params, model_cfg, source="init_params")
        params = jax.device_put(_as_float32(rng_or_params), base_sh)
        state_key = _raw_key(rng if rng is not None else jax.random.key(0))
    key = jax.random.key(0) if lora_key is None else lora_key
    adapters = jax.jit(
        lambda k: lora_lib.init_adapters(
            model_cfg, finetuning.targets, finetuning.rank, finetuning.alpha, k
        ),
        out_shardings=sh.params[LORA_KEY],
    )(key)
    build = jax.jit(lambda p, k: _build_state(p, optimizer, k, finetuning), out_shardings=sh)
    return build({**params, LORA_KEY: adapters}, state_key), sh


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and (
        jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == jnp.uint32 and x.shape == (2,))
    )


def _typed_key(x: jax.Array) -> jax.Array:
    return x if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(x)


def _as_float32(params: Any) -> Any:
    """Cast on the host (numpy) or in place (jax): never gather a whole model onto one device."""
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, np.float32),
        params,
    )
