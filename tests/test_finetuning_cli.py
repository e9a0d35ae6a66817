"""Fine-tuning types end to end on the tiny config (integration tier): an IDEAL run with freeze
(frozen layers bit-identical in every round, influence over the trained layers only, the prefix
cache reused by the next round), an SFT run with LoRA (exported with the adapters merged) and an
IDEAL run with LoRA (influence over the adapters, evaluation of the adapted model)."""

import json
import os

import jax
import numpy as np
import pytest
from config_helpers import tiny_config

from ideal_jax import export, main
from ideal_jax.model import loading
from ideal_jax.train.checkpoint import restore_params_only

pytestmark = pytest.mark.integration
FREEZE = {"train.finetuning": "freeze", "train.freeze_trainable_layers": 1}


def _flat(tree):
    return {
        jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.fixture(scope="module")
def freeze_run(tmp_path_factory):
    """Two rounds; every prefix-cache entry on disk (0 GiB in memory), so round 1 can only reuse
    what round 0 wrote."""
    workdir = str(tmp_path_factory.mktemp("freeze"))
    result = main.run(tiny_config(rounds=1, **FREEZE, **{"train.prefix_cache_gib": 0.0}), workdir)
    return workdir, result


def _summary(workdir, k):
    return json.load(open(os.path.join(workdir, f"round_{k}", "train", "summary.json")))


def test_freeze_ideal_run_trains_only_the_top_layer(freeze_run):
    workdir, _ = freeze_run
    assert all(_summary(workdir, k)["finetuning"] == "freeze" for k in (0, 1))
    p0, p1 = (
        _flat(restore_params_only(os.path.join(workdir, f"round_{k}", "train", "checkpoints")))
        for k in (0, 1)
    )
    top = max(int(n.split(".")[1]) for n in p0 if n.startswith("layers."))
    assert top == 1  # the tiny preset's 2 layers: layer 1 trains
    for name in p0:  # both rounds start from the base model: frozen parameters agree exactly
        if name.startswith(f"layers.{top}."):
            assert not np.array_equal(p0[name], p1[name]), name  # trained on other mixtures
        else:
            np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)


def test_freeze_influence_is_over_the_trained_layers_only(freeze_run):
    workdir, _ = freeze_run
    influence = json.load(open(os.path.join(workdir, "round_0", "influence.json")))
    assert influence["layers"] == [f"layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]


def test_freeze_prefix_cache_is_reused_by_the_next_round(freeze_run):
    workdir, _ = freeze_run
    s0, s1 = _summary(workdir, 0)["prefix_cache"], _summary(workdir, 1)["prefix_cache"]
    assert s0["key"] == s1["key"]  # the same frozen parameters
    files = os.listdir(
        os.path.join(workdir, "prefix_cache", os.listdir(os.path.join(workdir, "prefix_cache"))[0])
    )
    # Training's entries, plus the reference examples the influence stage added.
    assert len(files) >= s0["computed"] + s1["computed"] > 0
    assert s1["computed"] < s0["computed"]  # D1 shares most of D0's examples
    assert os.path.isdir(os.path.join(workdir, "final_model"))


def test_freeze_influence_reads_the_training_prefix_cache(freeze_run, tmp_path):
    """Round 0's influence stage read the hidden states entering the trained layer from the
    training's cache: computed again without it, α agrees to float rounding; and read again with
    it, nothing is computed (every training, curvature and reference example is on disk)."""
    from ideal_jax import sharding
    from ideal_jax.data import mixture as mixture_lib
    from ideal_jax.data import suite as suite_lib
    from ideal_jax.influence import stage as stage_lib
    from ideal_jax.train import prefix_cache as prefix_lib

    workdir, _ = freeze_run
    from ideal_jax.curvature import trained

    cfg = tiny_config(rounds=1, **FREEZE, **{"train.prefix_cache_gib": 0.0})
    cfg = trained.with_trained_curvature_layers(cfg)  # what the run's stages read: layer 1 only
    suite = suite_lib.load_suite(cfg, workdir)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    model_cfg, _ = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    params = jax.device_put(
        restore_params_only(os.path.join(workdir, "round_0", "train", "checkpoints"))
    )
    mix = mixture_lib.read_manifest(os.path.join(workdir, "round_0", "mixture.json"))
    recorded = json.load(open(os.path.join(workdir, "round_0", "influence.json")))
    computed, read = [], []
    original, original_hidden = prefix_lib.PrefixCache.compute, prefix_lib.PrefixCache.hidden

    def counting(self, examples):
        computed.append(len(examples))
        return original(self, examples)

    def reading(self, batch):
        read.append(batch["tokens"].shape[0])
        return original_hidden(self, batch)

    prefix_lib.PrefixCache.compute, prefix_lib.PrefixCache.hidden = counting, reading
    try:
        cached = stage_lib.influence_from_config(
            cfg,
            model_cfg,
            params,
            suite,
            mix,
            mesh,
            prefix_cache_dir=os.path.join(workdir, "prefix_cache"),
        )
    finally:
        prefix_lib.PrefixCache.compute, prefix_lib.PrefixCache.hidden = original, original_hidden
    assert read and computed == []  # every pass's hidden states read, none recomputed
    fresh = stage_lib.influence_from_config(cfg, model_cfg, params, suite, mix, mesh)
    got, want = cached.alpha.matrix, fresh.alpha.matrix
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * np.abs(want).max())
    np.testing.assert_allclose(got, np.asarray(recorded["matrix"]), rtol=1e-6)


def test_lora_sft_exports_the_merged_model(tmp_path):
    workdir = str(tmp_path / "lora")
    cfg = tiny_config(
        mode="sft",
        **{"train.finetuning": "lora", "train.lora_rank": 4, "train.learning_rate": 3e-3},
    )
    main.run(cfg, workdir)
    summary = json.load(open(os.path.join(workdir, "round_0", "train", "summary.json")))
    assert summary["finetuning"] == "lora" and summary["rank"] == 4
    raw = restore_params_only(os.path.join(workdir, "round_0", "train", "checkpoints"))
    assert "lora" in raw
    tokenizer_dir = os.path.join(workdir, "final_model")
    model_cfg = loading.model_config(cfg.model, _tokenizer(tokenizer_dir))
    merged = _flat(export.round_params(workdir, 0, model_cfg))
    base = _flat({k: v for k, v in raw.items() if k != "lora"})
    # The exported weights are the base plus the adapters, not the base alone.
    assert any(not np.array_equal(merged[k], base[k]) for k in merged)


def _tokenizer(path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def test_freeze_rerun_resumes_with_the_cache_in_the_workdir(freeze_run):
    workdir, result = freeze_run
    again = main.run(tiny_config(rounds=1, **FREEZE, **{"train.prefix_cache_gib": 0.0}), workdir)
    assert again["rounds"][0]["alpha"] == result["rounds"][0]["alpha"]
    assert again["scores"] == result["scores"]


def test_lora_ideal_run_computes_influence_over_the_adapters(tmp_path):
    workdir = str(tmp_path / "lora_ideal")
    cfg = tiny_config(
        rounds=1,
        **{"train.finetuning": "lora", "train.lora_rank": 4, "train.learning_rate": 3e-3},
    )
    main.run(cfg, workdir)
    influence = json.load(open(os.path.join(workdir, "round_0", "influence.json")))
    assert influence["layers"] == sorted(
        f"lora.layers.{i}.mlp.{p}_proj.lora_{ab}"
        for i in (0, 1)
        for p in ("gate", "up", "down")
        for ab in "ab"
    )
    alpha = np.asarray(influence["matrix"], float)
    assert np.all(np.isfinite(alpha)) and np.abs(alpha).max() > 0
    raw = restore_params_only(os.path.join(workdir, "round_1", "train", "checkpoints"))
    assert "lora" in raw  # round 1 trained adapters again (from the base model)
    # Evaluation ran the adapted model: eval.json's reference loss is the merged model's, not
    # the base model's.
    from ideal_jax import sharding
    from ideal_jax.data import suite as suite_lib
    from ideal_jax.evaluate.stage import reference_losses

    suite = suite_lib.load_suite(cfg, workdir)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    model_cfg, base = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    merged = export.round_params(workdir, 0, model_cfg)
    pad = suite.tokenizer.pad_token_id or 0
    args = (suite, mesh, cfg.influence.batch_size, cfg.train.seq_len, pad)
    recorded = json.load(open(os.path.join(workdir, "round_0", "eval.json")))["reference_loss"]
    adapted = reference_losses(model_cfg, merged, *args)["all"]
    assert abs(recorded["all"] - adapted) < 1e-4
    assert abs(recorded["all"] - reference_losses(model_cfg, base, *args)["all"]) > 1e-3
