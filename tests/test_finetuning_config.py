"""train.finetuning's fields on the command line: bad input exits 2 naming the field before the
workdir exists; with freeze, the run's curvature layers are the trained layers only."""

import os

import jax
import pytest
from config_helpers import tiny_config

from ideal_jax import ideal, main
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.model import config as model_config
from ideal_jax.model.transformer import abstract_params
from ideal_jax.train import finetuning as finetuning_lib

TINY_LAYERS = model_config.preset("tiny", vocab_size=8).num_layers


@pytest.mark.parametrize(
    "changes, field",
    [
        (
            {"train.finetuning": "freeze", "train.freeze_trainable_layers": TINY_LAYERS + 1},
            "train.freeze_trainable_layers",
        ),
        (
            {"train.finetuning": "freeze", "train.freeze_trainable_layers": 0},
            "train.freeze_trainable_layers",
        ),
        (
            {"train.finetuning": "lora", "mode": "sft", "train.lora_targets": "q_proj,qkv"},
            "train.lora_targets",
        ),
        ({"train.finetuning": "lora", "mode": "sft", "train.lora_rank": 0}, "train.lora_rank"),
        ({"train.finetuning": "lora", "mode": "sft", "train.lora_rank": -1}, "train.lora_rank"),
        (
            {"train.finetuning": "lora", "mode": "ideal", "curvature.device_memory_gib": 40.0},
            "train.finetuning",
        ),
        (
            {
                "train.finetuning": "lora",
                "train.lora_targets": "q_proj,v_proj",
                "curvature.layers": "mlp",
            },
            "curvature.layers",
        ),
        (
            {"train.finetuning": "lora", "curvature.layers": r"layers\.\d+\.mlp\.up_proj"},
            "curvature.layers",
        ),
        ({"train.finetuning": "partial"}, "train.finetuning"),
        (
            {
                "train.finetuning": "freeze",
                "train.freeze_trainable_layers": 1,
                "curvature.layers": r"layers\.\d+\.mlp\.up_proj",
            },
            "curvature.layers",
        ),
    ],
)
def test_bad_finetuning_fields_exit_2_naming_the_field(changes, field, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        main.command(tiny_config(**changes), workdir)
    assert stop.value.code == 2
    assert field in capsys.readouterr().err
    assert not os.path.exists(workdir)


def test_good_finetuning_configs_pass_the_checks():
    finetuning_lib.check_config(tiny_config(**{"train.finetuning": "lora", "mode": "sft"}))
    finetuning_lib.check_config(tiny_config(**{"train.finetuning": "freeze"}))
    finetuning_lib.check_config(tiny_config())
    from ideal_jax.curvature import trained

    trained.check_config(tiny_config(**{"train.finetuning": "lora"}))  # ideal on a CPU
    sft = {"train.finetuning": "lora", "mode": "sft", "train.lora_targets": "q_proj"}
    trained.check_config(tiny_config(**sft))  # no influence: the mlp preset is not read


@pytest.mark.parametrize("preset", ["mlp", "attention", "all_linear"])
def test_freeze_curvature_layers_default_to_the_trained_layers(preset):
    """A run's config (ideal._config_parts, what every stage reads) has curvature.layers over
    the top N layers only; full fine-tuning keeps the preset."""
    changes = {"train.finetuning": "freeze", "train.freeze_trainable_layers": 1}
    cfg = tiny_config(**changes, **{"curvature.layers": preset})
    run_cfg = ideal._config_parts(cfg)["cfg"]
    params = abstract_params(model_config.preset("tiny", vocab_size=8))
    everything = layers_lib.select_layers(params, preset)
    chosen = layers_lib.select_layers(params, run_cfg.curvature.layers)
    top = f"layers.{TINY_LAYERS - 1}."
    assert chosen == tuple(p for p in everything if p.startswith(top)) and chosen
    assert cfg.curvature.layers == preset  # the caller's config is not changed
    full = tiny_config(**{"curvature.layers": preset})
    assert ideal._config_parts(full)["cfg"].curvature.layers == preset


def test_user_regexes_over_trained_layers_are_kept():
    top = TINY_LAYERS - 1
    pattern = rf"layers\.{top}\.mlp\.(gate|up)_proj"
    cfg = tiny_config(
        **{
            "train.finetuning": "freeze",
            "train.freeze_trainable_layers": 1,
            "curvature.layers": pattern,
        }
    )
    assert ideal._config_parts(cfg)["cfg"].curvature.layers == pattern


def test_split_keeps_paths_and_join_restores_the_tree():
    cfg = model_config.preset("tiny", vocab_size=8)
    params = jax.tree.map(lambda s: s.shape, abstract_params(cfg))
    spec = finetuning_lib.Finetuning("freeze", cfg.num_layers, trainable_layers=1)
    trainable, frozen = spec.split(params)
    assert list(trainable) == ["layers"] and list(trainable["layers"]) == [cfg.num_layers - 1]
    assert cfg.num_layers - 1 not in frozen["layers"]
    assert spec.join(trainable, frozen) == params


@pytest.mark.parametrize(
    "targets, preset, chosen",
    [
        ("all", "mlp", ("gate_proj", "up_proj", "down_proj")),
        ("q_proj,v_proj,up_proj", "mlp", ("up_proj",)),
        ("q_proj,v_proj", "attention", ("q_proj", "v_proj")),
        ("q_proj,down_proj", "lora", ("q_proj", "down_proj")),
    ],
)
def test_lora_curvature_layers_are_the_adapters_of_the_preset(targets, preset, chosen):
    """A LoRA run's config has curvature.layers over the adapters (both matmuls) of the
    projections the preset names, in every layer, and nothing else."""
    from ideal_jax.model import lora as lora_lib
    from ideal_jax.model.transformer import LORA_KEY

    cfg = tiny_config(
        **{
            "train.finetuning": "lora",
            "train.lora_targets": targets,
            "train.lora_rank": 2,
            "curvature.layers": preset,
        }
    )
    run_cfg = ideal._config_parts(cfg)["cfg"]
    model = model_config.preset("tiny", vocab_size=8)
    params = {
        **abstract_params(model),
        LORA_KEY: lora_lib.abstract_adapters(model, lora_lib.parse_targets(targets), 2),
    }
    got = layers_lib.select_layers(params, run_cfg.curvature.layers)
    want = {
        f"lora.layers.{i}.{lora_lib.PROJECTIONS[p]}.{p}.lora_{ab}"
        for i in range(TINY_LAYERS)
        for p in chosen
        for ab in "ab"
    }
    assert set(got) == want


def test_freeze_layers_are_counted_from_the_checkpoint(tmp_path):
    """With model.path, N is checked against the checkpoint's config.json (no weights loaded)."""
    from ideal_jax.curvature import trained
    from ideal_jax.model import hf_io
    from ideal_jax.model.transformer import init_params
    from ideal_jax.utils.errors import InputError

    model = model_config.preset("tiny", vocab_size=32).replace(num_layers=3)
    hf_io.save_hf(str(tmp_path), model, init_params(model, jax.random.key(0)))
    freeze = {"train.finetuning": "freeze", "model.path": str(tmp_path)}
    trained.check_config(tiny_config(**freeze, **{"train.freeze_trainable_layers": 3}))
    with pytest.raises(InputError, match="1..3"):
        trained.check_config(tiny_config(**freeze, **{"train.freeze_trainable_layers": 4}))
