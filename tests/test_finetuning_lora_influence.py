"""Curvature over LoRA adapters: each adapter matmul is a kfac-jax dense block, and on a tiny
decoder with one real token (every block's curvature is then a Kronecker product) K-FAC and EK-FAC
over the adapters equal the exact damped GGN / empirical Fisher over the adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_curvature_exactness import _build, _random_like, _rel_err
from test_curvature_models import lm_batches, tiny_lm

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.model import lora as lora_lib
from ideal_jax.model.transformer import LORA_KEY
from ideal_jax.utils.errors import InputError


def lora_lm(targets=("v_proj", "up_proj", "down_proj")):
    # (not q_proj: with one real token its softmax is 1 whatever q is, so its block is zero)
    cfg, base = tiny_lm()
    adapters = lora_lib.init_adapters(cfg, targets, 2, 4.0, jax.random.key(3))
    # Non-zero B: with B = 0 every gradient of A vanishes and the A blocks are only the damping.
    keys = iter(jax.random.split(jax.random.key(4), 16))
    for block in adapters["layers"][0].values():
        for adapter in block.values():
            shape = adapter["lora_b"]["kernel"].shape
            adapter["lora_b"]["kernel"] = 0.5 * jax.random.normal(next(keys), shape)
    return cfg, {**base, LORA_KEY: adapters}


def one_token_batch(cfg):
    batch = lm_batches(cfg.vocab_size, 1, 2, 6)[0]
    seg = np.zeros((2, 6), np.int32)
    seg[0, 0] = 1
    return {
        **batch,
        "segment_ids": jnp.asarray(seg),
        "weights": jnp.asarray(seg, jnp.float32),
        "positions": jnp.zeros((2, 6), jnp.int32),
    }


def test_lora_preset_selects_both_matmuls_of_every_adapter():
    _, params = lora_lm()
    layers = layers_lib.select_layers(params, "lora")
    assert set(layers) == {
        f"lora.layers.0.{block}.{proj}.lora_{ab}"
        for block, proj in (("self_attn", "v_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
        for ab in "ab"
    }


def test_base_layers_of_a_lora_model_are_refused():
    """H over the frozen base weights of a LoRA model is over the wrong parameters."""
    _, params = lora_lm()
    with pytest.raises(InputError, match="curvature.layers"):
        layers_lib.select_layers(params, "mlp")


@pytest.mark.parametrize("estimator, kind", [("empirical", "empirical"), ("ggn_exact", "ggn")])
def test_kfac_and_ekfac_over_adapters_match_the_exact_damped_curvature(estimator, kind):
    cfg, params = lora_lm()
    batch = one_token_batch(cfg)
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "lora"))
    curvature = kfac_lib.KfacCurvature(problem, estimator)
    state = kfac_lib.accumulate_factors(curvature, params, [batch], jax.random.key(0))
    v = _random_like(layers_lib.split_params(params, problem.layers)[0])
    exact = _build("exact_block", problem, params, [batch], kind=kind)(v)
    assert _rel_err(_build("kfac", problem, params, [batch], curvature, state)(v), exact) < 1e-4
    if estimator == "empirical":
        state = ekfac_lib.fit_eigen_correction(curvature, state, params, [batch], jax.random.key(1))
        got = _build("ekfac", problem, params, [batch], curvature, state)(v)
        assert _rel_err(got, exact) < 1e-4


def test_adapter_gradients_are_those_of_the_adapted_model():
    """The exact operator differentiates the adapters: its GGN product over the A and B of one
    adapter equals jvp/vjp through scale · (x A) B computed by hand."""
    cfg, params = lora_lm(targets=("down_proj",))
    batch = one_token_batch(cfg)
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "lora"))
    selected, rest = layers_lib.split_params(params, problem.layers)

    def loss(sel):
        total, weight = problem_lib.weighted_loss_sum(
            problem, layers_lib.merge_params(sel, rest), batch
        )
        return total / weight

    def loss_merged(sel):
        merged = lora_lib.merge(layers_lib.merge_params(sel, rest))
        total, weight = problem_lib.weighted_loss_sum(problem, merged, batch)
        return total / weight

    got, want = jax.grad(loss)(selected), jax.grad(loss_merged)(selected)
    assert _rel_err(got, want) < 1e-4
    assert float(jnp.abs(got["lora.layers.0.mlp.down_proj.lora_a"]["kernel"]).max()) > 0
