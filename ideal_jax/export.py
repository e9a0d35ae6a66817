"""The trained model out of a workdir as a Hugging Face directory that transformers loads.

    DIR/final_model/          the last round's model, written when an ideal / sft run ends
                              (cfg.export.final_model)
    DIR/round_K/hf_model/     mode=export: round K's model (cfg.export.round; -1 = the last trained)

Each holds model.safetensors, config.json, the tokenizer files and the chat template
(chat_template.jinja), so `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoTokenizer.from_pretrained(dir).apply_chat_template(...)` work with nothing else. The model is
read back from the round's last training checkpoint (DIR/round_K/train/checkpoints); a LoRA run's
adapters are merged into the base weights (a plain model, not a PEFT adapter). A directory is
written next to its destination and renamed into place: an interrupted export leaves the previous
one intact.

mode=export reads the run's own DIR/config.json and refuses a command whose config differs from it
in anything but `mode` and `export.*` (the exported model must be the one that run trained).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from ideal_jax.configlib.fields import RESUMABLE_FIELDS, to_json
from ideal_jax.configlib.workdir import check_same_config
from ideal_jax.data import suite as suite_lib
from ideal_jax.model import hf_io, loading, lora
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import Params, abstract_params
from ideal_jax.utils.errors import InputError

DTYPES = ("float32", "bfloat16")
# Fields that may differ between the run and `mode=export` on its workdir.
_EXPORT_FIELDS = ("mode", "export.round", "export.final_model", "export.dtype")


def export_settings(cfg) -> dict[str, Any]:
    """cfg.export with defaults for configs that predate the section."""
    section = dict(cfg.export) if "export" in cfg else {}
    settings = {"final_model": True, "round": -1, "dtype": "float32", **section}
    if settings["dtype"] not in DTYPES:
        raise InputError(
            f"{settings['dtype']!r} is not allowed; allowed: {', '.join(DTYPES)}",
            field="export.dtype",
        )
    return settings


def trained_rounds(workdir: str) -> list[int]:
    """Rounds of the workdir whose training finished (round_K/train/summary.json), ascending."""
    rounds = []
    for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
        match = re.fullmatch(r"round_(\d+)", name)
        if match and os.path.exists(os.path.join(workdir, name, "train", "summary.json")):
            rounds.append(int(match.group(1)))
    return sorted(rounds)


def round_params(workdir: str, k: int, model_cfg: ModelConfig) -> Params:
    """Round k's trained parameters (host numpy arrays) from its last checkpoint."""
    from ideal_jax.train.checkpoint import restore_params_only

    directory = os.path.join(workdir, f"round_{k}", "train", "checkpoints")
    if not os.path.isdir(directory):
        raise InputError(f"round {k} has no training checkpoints", path=directory)
    restored = lora.merge_host(restore_params_only(directory))  # LoRA: W + (alpha/r) A B
    shapes = abstract_params(model_cfg)
    # Orbax may restore the list of layers as a dict keyed "0", "1", ...: rebuild our structure.
    flat = {
        jax.tree_util.keystr(path, simple=True, separator="."): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
    }

    def pick(path, shape):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if name not in flat or tuple(np.shape(flat[name])) != tuple(shape.shape):
            raise InputError(
                f"checkpoint does not match the model config (expected shape {shape.shape})",
                path=directory,
                field=name,
            )
        return np.asarray(flat[name], dtype=np.float32)

    return jax.tree_util.tree_map_with_path(pick, shapes)


def write_hf_dir(
    out_dir: str, model_cfg: ModelConfig, params: Params, tokenizer, dtype: str = "float32"
) -> str:
    """save_hf into a temporary sibling directory, then rename it into place (atomic)."""
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_io.save_hf(tmp, model_cfg, params, tokenizer, dtype=dtype)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        path = os.path.join(tmp, "chat_template.jinja")
        if not os.path.exists(path):  # older transformers keep it in tokenizer_config.json only
            with open(path, "w") as f:
                f.write(tokenizer.chat_template)
    old = f"{out_dir}.old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export_round(cfg, workdir: str, k: int, out_dir: str, *, model_cfg=None, tokenizer=None) -> str:
    """Round k's trained model → out_dir (a Hugging Face directory); returns out_dir."""

    start = time.perf_counter()
    logging.info("export: round %d -> %s", k, out_dir)
    if tokenizer is None:
        tokenizer = suite_lib.load_run_tokenizer(cfg, workdir)
    if model_cfg is None:
        model_cfg = loading.model_config(cfg.model, tokenizer)
    params = round_params(workdir, k, model_cfg)
    write_hf_dir(out_dir, model_cfg, params, tokenizer, dtype=export_settings(cfg)["dtype"])
    logging.info("export: done in %.1f s", time.perf_counter() - start)
    return out_dir


def export_final(cfg, workdir: str) -> str | None:
    """DIR/final_model/ from the last trained round, if cfg.export.final_model (lead host only)."""
    from ideal_jax.utils.distributed import is_lead_host

    rounds = trained_rounds(workdir)
    if not export_settings(cfg)["final_model"] or not rounds or not is_lead_host():
        return None
    k = rounds[-1]
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.exists(summary_path):  # the step policy's result: the best accepted round
        with open(summary_path, encoding="utf-8") as f:
            k = int(json.load(f).get("result_round", k))
    return export_round(cfg, workdir, k, os.path.join(workdir, "final_model"))


def run_export(cfg, workdir: str) -> dict[str, Any]:
    """mode=export: round cfg.export.round's model → DIR/round_K/hf_model/."""
    settings = export_settings(cfg)
    check_same_run(cfg, workdir)
    rounds = trained_rounds(workdir)
    if not rounds:
        raise InputError("no round of this workdir has finished training", path=workdir)
    k = rounds[-1] if settings["round"] < 0 else int(settings["round"])
    if k not in rounds:
        raise InputError(
            f"round {k} has not finished training; trained rounds: {rounds}", field="export.round"
        )
    out = export_round(cfg, workdir, k, os.path.join(workdir, f"round_{k}", "hf_model"))
    return {"round": k, "path": out}


def check_same_run(cfg, workdir: str) -> None:
    """InputError unless DIR/config.json was written by this config (modulo mode and export.*)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise InputError("not a workdir of a finished run (no config.json)", path=path)
    check_same_config(
        path,
        json.loads(to_json(cfg)),
        (*RESUMABLE_FIELDS, *_EXPORT_FIELDS),
        "pass the run's own config with --config.mode=export",
    )
