"""The layers below the lowest curvature layer run once per batch and are reused by every pass of
the influence stage (problem.PREFIX_HIDDEN, curvature.prefix_cache_gib): same logits, same α."""

import jax
import numpy as np
import pytest
from config_helpers import tiny_config

from ideal_jax import sharding
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.data import mixture
from ideal_jax.data import suite as suite_lib
from ideal_jax.influence import stage
from ideal_jax.model import loading, transformer
from ideal_jax.model.config import preset

MODEL = preset("tiny", 64).replace(num_layers=3)


def test_forward_from_a_kept_hidden_state_equals_the_whole_forward():
    params = transformer.init_params(MODEL, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(1, 64, size=(2, 10)).astype(np.int32)
    whole = transformer.forward(MODEL, params, tokens)
    for start in (1, 2):
        hidden = transformer.forward(MODEL, params, tokens, num_layers=start, return_hidden=True)
        rest = transformer.forward(MODEL, params, tokens, start_layer=start, hidden_btd=hidden)
        np.testing.assert_allclose(np.asarray(rest), np.asarray(whole), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        transformer.forward(MODEL, params, tokens, start_layer=1)  # no hidden state given


def test_first_decoder_layer():
    assert problem_lib.first_decoder_layer(("layers.3.mlp.up_proj", "layers.1.mlp.down_proj")) == 1
    assert problem_lib.first_decoder_layer(("layers.2.mlp.up_proj", "lm_head")) == 0


def test_the_stage_gives_the_same_alpha_with_the_prefix_kept(tmp_path):
    # The tiny model's top layer's MLP only: layers below it run once (start = 1) or every pass.
    # EK-FAC: factors, correction, reference and domain gradients all read the kept hidden state.
    cfg = tiny_config(
        **{
            "curvature.layers": r"layers\.1\.mlp\.(gate|up|down)_proj",
            "curvature.examples_per_domain": 8,
            "influence.operator": "ekfac",
        }
    )
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, str(tmp_path))
    model_cfg, params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=0)
    ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
    mix = mixture.build_mixture(ids, None, seed=0, keep_total=True)
    results = {}
    for gib in (0.0, 2.0):
        cfg.curvature.prefix_cache_gib = gib
        results[gib] = stage.influence_for_round(
            cfg.curvature, cfg.influence, model_cfg, params, suite, mix, mesh,
            seed=0, train_seq_len=cfg.train.seq_len,
        )  # fmt: skip
    assert "prefix_layers" in results[2.0].timings and "prefix_layers" not in results[0.0].timings
    a0, a1 = (np.asarray(results[g].alpha.matrix) for g in (0.0, 2.0))
    assert np.abs(a0).max() > 0
    np.testing.assert_allclose(a1, a0, rtol=2e-4, atol=1e-6 * np.abs(a0).max())
