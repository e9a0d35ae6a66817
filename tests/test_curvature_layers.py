"""Layer selection, the kfac-jax block list, bad input and save/reload of the curvature state."""

import jax
import jax.numpy as jnp
import pytest
from test_curvature_models import lm_batches, tiny_lm

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.utils.errors import InputError


def test_presets_and_block_list():
    cfg, params = tiny_lm(layers=2)
    assert layers_lib.select_layers(params, "mlp") == tuple(
        f"layers.{i}.mlp.{n}_proj" for i in range(2) for n in ("down", "gate", "up")
    )
    assert len(layers_lib.select_layers(params, "attention")) == 8
    assert len(layers_lib.select_layers(params, "all_linear")) == 14
    with pytest.warns(UserWarning, match="lm_head"):
        layers_lib.select_layers(params, "lm_head")
    with pytest.raises(InputError, match="match no linear layer"):
        layers_lib.select_layers(params, r"nothing\.here")
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    curvature = kfac_lib.KfacCurvature(problem)
    state = curvature.init(params, lm_batches(cfg.vocab_size, 1, 2, 8)[0], jax.random.key(0))
    assert sorted(curvature.block_paths()) == sorted(problem.layers)
    assert all(type(b).__name__ == "DenseTwoKroneckerFactored" for b in curvature.estimator.blocks)
    assert set(state.block_paths) == set(problem.layers)


def test_bad_input_and_state_roundtrip(tmp_path):
    cfg, params = tiny_lm()
    batch = lm_batches(cfg.vocab_size, 1, 2, 8)[0]
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, "mlp"))
    curvature = kfac_lib.KfacCurvature(problem)
    empty = {**batch, "weights": jnp.zeros_like(batch["weights"])}
    with pytest.raises(InputError, match="no response tokens"):
        kfac_lib.accumulate_factors(curvature, params, [empty], jax.random.key(0))
    state = kfac_lib.accumulate_factors(curvature, params, [batch], jax.random.key(0))
    state = ekfac_lib.fit_eigen_correction(curvature, state, params, [batch], jax.random.key(1))
    path = str(tmp_path / "curv.npz")
    ekfac_lib.save_state(path, state)
    template = curvature.init(params, batch, jax.random.key(0))
    loaded = ekfac_lib.load_state(path, template)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state)):
        assert jnp.array_equal(a, b)
    bad = loaded.replace(rows=jnp.asarray(jnp.nan))
    with pytest.raises(InputError, match="non-finite"):
        kfac_lib.check_finite(bad)
    other_cfg, other_params = tiny_lm(hidden=24)
    other = kfac_lib.KfacCurvature(
        problem_lib.lm_problem(other_cfg, layers_lib.select_layers(other_params, "mlp"))
    )
    other_template = other.init(other_params, batch, jax.random.key(0))
    with pytest.raises(InputError, match="shape"):
        ekfac_lib.load_state(path, other_template)
