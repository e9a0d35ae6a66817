"""DoReMi's proxy run on device: the jitted step (weight update, then the α-weighted proxy update).

The algorithm, its knobs and the artifact are described in ideal_jax/compare/doremi.py, which
drives this step over the mixture's batches (`doremi_weights`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ideal_jax import sharding
from ideal_jax.model.config import ModelConfig
from ideal_jax.train.state import abstract_train_state, state_shardings
from ideal_jax.train.step import group_sums, guarded_update, weighted_token_losses

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class DoremiState:
    """The proxy run's state, passed in and returned by `doremi_step`.

    log_alpha_j: [J] log of the smoothed domain weights α_t of the last step (log(1/J) at t = 0).
    alpha_sum_j: [J] Σ_t α_t over the updates applied so far (their mean is DoReMi's answer).
    nonfinite_step: -1, or the step at which a loss or gradient was first non-finite; from then
      on nothing is updated (as in train.step.train_step).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    log_alpha_j: jax.Array
    alpha_sum_j: jax.Array
    nonfinite_step: jax.Array


def domain_statistics(
    proxy_bt: jax.Array,
    reference_bt: jax.Array,
    weights_bt: jax.Array,
    domain_ids_bt: jax.Array,
    num_domains: int,
) -> dict[str, jax.Array]:
    """Per-domain sums ([J] each) from weighted token losses (token loss × weight, as returned by
    train.step.weighted_token_losses): the clipped excess, the proxy's loss, the token count.

    The excess is clipped per token before summing (Algorithm 1); padding (domain -1) is dropped.
    """
    excess_bt = jnp.maximum(proxy_bt - reference_bt, 0.0)
    return {
        "excess_sums": group_sums(excess_bt, domain_ids_bt, num_domains),
        "loss_sums": group_sums(proxy_bt, domain_ids_bt, num_domains),
        "tokens": group_sums(weights_bt, domain_ids_bt, num_domains),
    }


def update_domain_weights(
    log_alpha_j: jax.Array,
    excess_j: jax.Array,
    present_j: jax.Array,
    eta: float,
    smoothing: float,
) -> tuple[jax.Array, jax.Array]:
    """One DoReMi weight step: (log α_t, α_t) from log α_{t−1} and the per-domain excess λ_t.

    Domains not present in the batch get λ = 0 (whatever `excess_j` holds for them).
    """
    excess_j = jnp.where(present_j, excess_j, 0.0)
    alpha_j = jax.nn.softmax(log_alpha_j + eta * excess_j)
    smoothed_j = (1.0 - smoothing) * alpha_j + smoothing / alpha_j.shape[-1]
    return jnp.log(smoothed_j), smoothed_j


def _split_microbatches(batch: Batch, grad_accum: int, mesh: Mesh | None) -> Batch:
    """[B, T] -> [k, B/k, T], microbatch j = rows j, j+k, ... (as train.step: no data moves)."""

    def split(x_bt):
        b = x_bt.shape[0]
        x_kbt = jnp.swapaxes(x_bt.reshape(b // grad_accum, grad_accum, *x_bt.shape[1:]), 0, 1)
        if mesh is not None:
            spec = PartitionSpec(None, ("data", "fsdp"), None)
            x_kbt = jax.lax.with_sharding_constraint(x_kbt, NamedSharding(mesh, spec))
        return x_kbt

    return jax.tree.map(split, batch)


def _token_coefficients(coef_j: jax.Array, domain_ids_bt: jax.Array) -> jax.Array:
    """[B, T]: each token's coefficient in Σ_i α_i · mean loss_i (α_i / tokens_i; 0 on padding)."""
    valid_bt = (domain_ids_bt >= 0) & (domain_ids_bt < coef_j.shape[0])
    return jnp.where(valid_bt, coef_j[jnp.clip(domain_ids_bt, 0, coef_j.shape[0] - 1)], 0.0)


def doremi_step(
    state: DoremiState,
    batch: Batch,
    reference_params: Any,
    *,
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    num_domains: int,
    eta: float,
    smoothing: float,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
) -> tuple[DoremiState, dict[str, jax.Array]]:
    """One DoReMi step: the weight update, then one proxy update on the α-weighted loss.

    With grad_accum = 1 the proxy's forward pass serves both the excess and the gradient (a vjp
    whose cotangent is each token's coefficient). With grad_accum > 1 the weights need the whole
    batch's statistics before any gradient, so a first scan gathers them and a second one
    accumulates the gradient (one extra forward pass).
    """
    reference_params = jax.lax.stop_gradient(reference_params)

    def losses(params, mb):
        return weighted_token_losses(model_cfg, params, mb)

    def statistics(proxy_bt, mb):
        reference_bt = losses(reference_params, mb)
        return domain_statistics(
            proxy_bt, reference_bt, mb["weights"], mb["domain_ids"], num_domains
        )

    if grad_accum == 1:
        proxy_bt, pullback = jax.vjp(lambda p: losses(p, batch), state.params)
        stats = statistics(proxy_bt, batch)
    else:
        micro = _split_microbatches(batch, grad_accum, mesh)

        def stats_body(acc, mb):
            stats = statistics(losses(state.params, mb), mb)
            return jax.tree.map(jnp.add, acc, stats), None

        zeros = {k: jnp.zeros(num_domains) for k in ("excess_sums", "loss_sums", "tokens")}
        stats, _ = jax.lax.scan(stats_body, zeros, micro)

    present_j = stats["tokens"] > 0
    tokens_j = jnp.maximum(stats["tokens"], 1.0)
    excess_j = stats["excess_sums"] / tokens_j
    log_alpha_j, alpha_j = update_domain_weights(
        state.log_alpha_j, excess_j, present_j, eta, smoothing
    )
    # The proxy's objective: Σ_i α_i · (mean token loss of domain i); α is a constant here.
    coef_j = jnp.where(present_j, jax.lax.stop_gradient(alpha_j) / tokens_j, 0.0)
    loss = jnp.sum(coef_j * stats["loss_sums"])
    if grad_accum == 1:
        (grads,) = pullback(_token_coefficients(coef_j, batch["domain_ids"]))
    else:

        def grad_body(acc, mb):
            coef_bt = _token_coefficients(coef_j, mb["domain_ids"])
            grads = jax.grad(lambda p: jnp.sum(coef_bt * losses(p, mb)))(state.params)
            return jax.tree.map(jnp.add, acc, grads), None

        grads, _ = jax.lax.scan(grad_body, jax.tree.map(jnp.zeros_like, state.params), micro)

    grad_norm = optax.global_norm(grads)
    is_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(alpha_j))
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_state = guarded_update(
        state,
        is_finite,
        params=new_params,
        opt_state=new_opt_state,
        log_alpha_j=log_alpha_j,
        alpha_sum_j=state.alpha_sum_j + alpha_j,
    )
    metrics = {
        "alpha_j": alpha_j,
        "excess_j": jnp.where(present_j, excess_j, 0.0),
        "loss": loss,
        "grad_norm": grad_norm,
        "is_finite": is_finite,
    }
    return new_state, metrics


def init_doremi_state(params: Any, optimizer: optax.GradientTransformation, num_domains: int):
    return DoremiState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        log_alpha_j=jnp.full((num_domains,), -math.log(num_domains), jnp.float32),
        alpha_sum_j=jnp.zeros((num_domains,), jnp.float32),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def doremi_shardings(model_cfg: ModelConfig, optimizer, mesh: Mesh) -> DoremiState:
    """Parameters and Adam moments as the trainer shards them; the rest replicated."""
    train_sh = state_shardings(abstract_train_state(model_cfg, optimizer), model_cfg, mesh)
    replicated = sharding.replicated(mesh)
    return DoremiState(
        step=replicated,
        params=train_sh.params,
        opt_state=train_sh.opt_state,
        log_alpha_j=replicated,
        alpha_sum_j=replicated,
        nonfinite_step=replicated,
    )


def make_doremi_step(
    model_cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    shardings: DoremiState,
    mesh: Mesh,
    *,
    num_domains: int,
    eta: float,
    smoothing: float,
    grad_accum: int = 1,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[DoremiState, Batch, Any], tuple[DoremiState, dict[str, jax.Array]]]:
    """The module-level doremi_step, bound with functools.partial and jitted once (state donated;
    the reference parameters are read only). compiler_options: as train.step.jit_train_step's
    (tests only)."""
    step_fn = functools.partial(
        doremi_step,
        model_cfg=model_cfg,
        optimizer=optimizer,
        num_domains=num_domains,
        eta=float(eta),
        smoothing=float(smoothing),
        grad_accum=grad_accum,
        mesh=mesh if grad_accum > 1 else None,
    )
    return jax.jit(
        step_fn,
        in_shardings=(shardings, sharding.batch_sharding(mesh), shardings.params),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options,
    )
