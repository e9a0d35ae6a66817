"""The trained model out as a Hugging Face directory: mode=export and DIR/final_model/.

The fast tests build a workdir as a finished tiny run leaves it (config.json, the demo tokenizer, a
training checkpoint of random parameters, round_0/train/summary.json) without training, export it,
and load the result with transformers: same logits, same greedy continuation, same chat template.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from ideal_jax import export, main
from ideal_jax.configlib.workdir import prepare_workdir
from ideal_jax.data import demo_suite
from ideal_jax.model import decoding
from ideal_jax.model.config import preset
from ideal_jax.model.transformer import abstract_params
from ideal_jax.model.transformer import forward as _forward
from ideal_jax.train.checkpoint import Checkpointer
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
forward = jax.jit(_forward, static_argnums=0)


def _config(**changes):
    cfg = tiny.get_config()
    cfg.unlock()
    cfg.progress = False
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return cfg.lock()


def _fake_finished_run(workdir, cfg, rounds=(0,)):
    """A workdir as a finished run leaves it; returns {round: params} (random, distinct)."""
    prepare_workdir(cfg, workdir)
    tokenizer = demo_suite.build_tokenizer()
    tokenizer.save_pretrained(os.path.join(workdir, "demo_data", "tokenizer"))
    model_cfg = preset("tiny", vocab_size=len(tokenizer)).replace(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    out = {}
    for k in rounds:
        rng = np.random.default_rng(k)
        # Random weights, norm scales away from 1: a dropped or misplaced tensor shows in logits.
        params = jax.tree.map(
            lambda a, rng=rng: rng.normal(a.ndim == 1, 0.3, a.shape).astype(np.float32),
            abstract_params(model_cfg),
        )
        # The checkpoint as the trainer writes it; export reads only `params` of the state.
        ckpt = Checkpointer(
            os.path.join(workdir, f"round_{k}", "train", "checkpoints"), save_every=1, keep=1
        )
        ckpt.save(7, {"params": params}, {"step": 7})
        ckpt.close()
        write_json_atomic(os.path.join(workdir, f"round_{k}", "train", "summary.json"), {})
        out[k] = params
    return model_cfg, tokenizer, out


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def test_mode_export_round_trips_through_transformers(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _config()
    model_cfg, tokenizer, params = _fake_finished_run(workdir, cfg, rounds=(0, 1))
    result = main.run(_config(mode="export", **{"export.round": 0}), workdir)
    out = os.path.join(workdir, "round_0", "hf_model")
    assert result == {"round": 0, "path": out}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert os.path.exists(os.path.join(out, name)), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "reverse: abc"}]
    prompt = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ours = np.asarray(forward(model_cfg, params[0], np.asarray([ids])))
    np.testing.assert_allclose(ours, _torch_logits(model, [ids]), atol=1e-4, rtol=0)
    # Round 1's model differs: the export took round 0's checkpoint, not the latest.
    assert np.abs(ours - np.asarray(forward(model_cfg, params[1], np.asarray([ids])))).max() > 1e-2
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model_cfg.pad_token_id,
        )[0, len(ids) :].tolist()
    mine = decoding.generate(model_cfg, params[0], [ids], max_new_tokens=8)[0]
    assert mine == theirs


def test_final_model_is_the_last_round(tmp_path):
    workdir = str(tmp_path / "run")
    cfg = _config()
    model_cfg, _, params = _fake_finished_run(workdir, cfg, rounds=(0, 1))
    out = export.export_final(cfg, workdir)
    assert out == os.path.join(workdir, "final_model")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.arange(12)[None] % model_cfg.vocab_size
    ours = np.asarray(forward(model_cfg, params[1], tokens))
    np.testing.assert_allclose(ours, _torch_logits(model, tokens), atol=1e-4, rtol=0)
    # Off: nothing written.
    os.rename(out, out + ".first")
    assert export.export_final(_config(**{"export.final_model": False}), workdir) is None
    assert not os.path.exists(out)


def test_export_bad_input(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(InputError, match="no config.json"):
        main.run(_config(mode="export"), workdir)
    _fake_finished_run(workdir, _config())
    with pytest.raises(InputError, match="round 3 has not finished training") as e:
        main.run(_config(mode="export", **{"export.round": 3}), workdir)
    assert e.value.field == "export.round"
    with pytest.raises(InputError, match="different config") as e:
        main.run(_config(mode="export", seed=5), workdir)
    assert e.value.field == "seed"
    with pytest.raises(InputError, match="export.dtype|allowed"):
        main.run(_config(mode="export", **{"export.dtype": "int8"}), workdir)
    assert not os.path.exists(os.path.join(workdir, "round_0", "hf_model"))
    assert json.load(open(os.path.join(workdir, "config.json")))["mode"] == "ideal"


@pytest.mark.slow
def test_cli_sft_then_export(tmp_path):
    """The commands a user runs: an sft run writes final_model/; mode=export writes hf_model/."""
    workdir = str(tmp_path / "run")
    base = [sys.executable, "-m", "ideal_jax.main", "--config", "configs/tiny.py"]
    base += ["--workdir", workdir, "--config.progress=false"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(base + ["--config.mode=sft"], cwd=ROOT, env=env, check=True)
    assert os.path.exists(os.path.join(workdir, "final_model", "model.safetensors"))
    done = subprocess.run(
        base + ["--config.mode=export"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    out = os.path.join(workdir, "round_0", "hf_model")
    final = os.path.join(workdir, "final_model")
    a = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(final).eval()
    tokens = [[1, 5, 9, 13]]
    np.testing.assert_array_equal(_torch_logits(a, tokens), _torch_logits(b, tokens))
    bad = subprocess.run(
        base + ["--config.mode=export", "--config.export.round=4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "export.round" in bad.stderr, bad.stderr
