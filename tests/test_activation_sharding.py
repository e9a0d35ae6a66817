"""Activation shardings: on a mesh, the SFT step and the K-FAC factor pass compile without XLA's
"involuntary full rematerialization" (a tensor replicated on every device to change its layout),
and pinning the activations changes no number.

Before the model pinned its residual stream to rows over (data, fsdp), the embedding lookup of a
table sharded over (tensor, fsdp) produced [B, T, D] with D over fsdp, and kfac-jax's loss trace
laid token rows out like the row-sharded factors: XLA replicated them to move back
(sharding.py, "Activation shardings").
"""

import numpy as np
import pytest

from configs import common
from ideal_jax import sharding
from ideal_jax.curvature import memory_plan
from ideal_jax.model import transformer
from ideal_jax.model.config import preset

WARNING = "Involuntary full rematerialization"
# Shapes used nowhere else in the suite: the programs are compiled here, not found in a cache.
MODEL = preset("tiny", 96).replace(num_layers=2)


def test_train_step_compiles_without_full_rematerialization(capfd):
    mesh = sharding.make_mesh((2, 2, 2))  # (1, 4, 2) compiled cleanly before the fix too
    train_cfg = common.base_config().train
    memory_plan.compile_train_step(MODEL, train_cfg, mesh, batch_size=8, seq_len=24)
    assert WARNING not in capfd.readouterr().err


@pytest.mark.parametrize("factor_pass", ["captures", "kfac_jax"])
def test_curvature_pass_compiles_without_full_rematerialization(capfd, monkeypatch, factor_pass):
    """The factor pass from the model's captures (the LM's default), and kfac-jax's own pass (what
    problems without a capture mode run)."""
    from ideal_jax.curvature import kfac as kfac_lib

    if factor_pass == "kfac_jax":
        monkeypatch.setattr(kfac_lib.KfacCurvature, "captured_factors", property(lambda s: False))
    mesh = sharding.make_mesh((1, 4, 2))  # (2, 2, 2) compiled cleanly before the fix too
    layers = ("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj")
    # a model of its own per pass: the compiled programs are cached per model
    model = MODEL.replace(vocab_size=96 if factor_pass == "captures" else 97)
    memory_plan.compile_curvature_pass(model, mesh, layers, batch_size=8, seq_len=20)
    assert WARNING not in capfd.readouterr().err


def test_pinned_activations_change_no_logit():
    import jax

    params = transformer.init_params(MODEL, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(1, 96, size=(8, 12)).astype(np.int32)
    plain = transformer.forward(MODEL, params, tokens)
    mesh = sharding.make_mesh((2, 2, 2))
    pinned = jax.jit(sharding.traced_in(mesh, lambda p, t: transformer.forward(MODEL, p, t)))(
        params, tokens
    )
    np.testing.assert_allclose(np.asarray(pinned), np.asarray(plain), rtol=1e-5, atol=1e-5)
