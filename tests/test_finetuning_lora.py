"""train.finetuning = lora: zero-initialised adapters leave the logits unchanged, training moves
only the adapters (base bit-identical) and resumes exactly, the exported model (adapters merged)
equals the adapted model in transformers, and bad fields are named."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_finetuning_freeze import (
    CFG,
    FAST_COMPILE,
    STEPS_PER_EPOCH,
    batches_for_epoch,
    host_params,
    mesh,
    train_config,
)

from ideal_jax.model import lora as lora_lib
from ideal_jax.model.transformer import LORA_KEY, forward
from ideal_jax.train import finetuning as finetuning_lib
from ideal_jax.train import run_sft
from ideal_jax.utils.errors import InputError

LORA = dict(finetuning="lora", lora_rank=2, lora_alpha=8.0, lora_targets="all", learning_rate=2e-2)


def train(workdir, die_at=None, **overrides):
    train_cfg = train_config(**{**LORA, **overrides})
    spec = finetuning_lib.from_config(train_cfg, CFG.num_layers)
    return run_sft(
        CFG,
        train_cfg,
        mesh(),
        workdir,
        functools.partial(batches_for_epoch, die_at=die_at),
        STEPS_PER_EPOCH,
        init_params=host_params(),
        domain_names=("d",),
        progress=False,
        compiler_options=FAST_COMPILE,
        finetuning=spec,
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    params, summary = train(root / "round_0" / "train")
    return root, jax.device_get(params), summary


def _tokens():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(1, CFG.vocab_size, (2, 12)), jnp.int32)


def test_zero_initialised_adapters_leave_logits_unchanged():
    base = host_params()
    adapters = lora_lib.init_adapters(CFG, lora_lib.PROJECTIONS, 4, 8.0, jax.random.key(1))
    assert float(jnp.abs(adapters["layers"][0]["mlp"]["up_proj"]["lora_a"]["kernel"]).max()) > 0
    plain = forward(CFG, base, _tokens())
    adapted = forward(CFG, {**base, LORA_KEY: adapters}, _tokens())
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))


def test_adapters_change_the_logits_by_scale_x_a_b():
    """A non-zero B on one projection: the forward equals the model with W + (alpha/r) A B."""
    base = host_params()
    adapters = lora_lib.init_adapters(CFG, ("v_proj",), 2, 4.0, jax.random.key(1))
    b = adapters["layers"][1]["self_attn"]["v_proj"]["lora_b"]
    b["kernel"] = jax.random.normal(jax.random.key(2), b["kernel"].shape) * 0.5
    params = {**base, LORA_KEY: adapters}
    adapted = np.asarray(forward(CFG, params, _tokens()))
    merged = np.asarray(forward(CFG, lora_lib.merge(params), _tokens()))
    assert np.abs(adapted - np.asarray(forward(CFG, base, _tokens()))).max() > 1e-2
    np.testing.assert_allclose(adapted, merged, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_the_adapters(reference):
    _, params, summary = reference
    assert LORA_KEY in params
    base = host_params()
    for path, x in jax.tree_util.tree_flatten_with_path(base)[0]:
        got = params
        for k in path:
            got = got[k.key]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(x), err_msg=str(path))
    b = params[LORA_KEY]["layers"][0]["mlp"]["down_proj"]["lora_b"]["kernel"]
    assert np.abs(b).max() > 0  # B left zero: the adapters moved
    assert float(params[LORA_KEY]["scale"]) == 4.0  # alpha / r, never trained
    assert summary["finetuning"] == "lora" and summary["rank"] == 2
    expected = sum(np.size(x) for x in jax.tree.leaves(params[LORA_KEY]["layers"]))  # adapters only
    assert summary["trainable_parameters"] == expected


def test_lora_resume_after_exception_is_exact(reference, tmp_path):
    _, ref_params, _ = reference
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, die_at=4)
    params, summary = train(tmp_path)
    assert summary["start_step"] == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref_params)


def test_merged_export_equals_the_adapted_model_in_transformers(reference, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ideal_jax import export

    root, params, _ = reference
    exported = export.round_params(str(root), 0, CFG)
    out = export.write_hf_dir(str(tmp_path / "hf"), CFG, exported, None)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = _tokens()
    with torch.no_grad():
        theirs = model(torch.asarray(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(CFG, params, tokens))
    base = np.asarray(forward(CFG, host_params(), tokens))
    assert np.abs(ours - base).max() > 1e-2  # the adapters matter for these logits
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"lora_rank": 0}, "train.lora_rank"),
        ({"lora_rank": -2}, "train.lora_rank"),
        ({"lora_targets": "q_proj,query"}, "train.lora_targets"),
        ({"lora_targets": ""}, "train.lora_targets"),
        ({"lora_alpha": 0.0}, "train.lora_alpha"),
        ({"finetuning": "qlora"}, "train.finetuning"),
    ],
)
def test_bad_lora_fields_are_named(overrides, field):
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        finetuning_lib.from_config(train_config(**{**LORA, **overrides}), CFG.num_layers)


def test_short_target_names():
    assert lora_lib.parse_targets("q,v") == ("q_proj", "v_proj")
    assert lora_lib.parse_targets("all") == tuple(lora_lib.PROJECTIONS)
