"""Curvature layers of a fine-tuned model: exactly the trained parameters.

With train.finetuning = freeze only the top N decoder layers train, so H and the gradients of
influence must be over (a subset of) those layers: a preset in cfg.curvature.layers (mlp,
attention, all_linear) becomes the same projections of the top N layers, and regexes that can
select a frozen layer are refused. With lora the adapters carry the trained parameters (the `lora`
preset of curvature/layers.py): a preset becomes the adapters of its projections, regexes must
select adapters ("lora.layers.N.<block>.<proj>.lora_a|b") and no base weight.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.model import lora as lora_lib
from ideal_jax.train import finetuning as finetuning_lib
from ideal_jax.train.finetuning import Finetuning
from ideal_jax.utils.errors import InputError


def curvature_layers(spec: Finetuning, patterns: str) -> str:
    """cfg.curvature.layers restricted to the trained decoder layers (freeze): a preset (mlp,
    attention, all_linear) becomes the same projections of the top N layers only; regexes are
    kept, and refused (InputError on curvature.layers) when they can select a frozen layer.
    `patterns` itself for full fine-tuning."""
    if spec.kind == "lora":
        return _lora_layers(spec, patterns)
    if spec.kind != "freeze":
        return patterns
    trained = "|".join(str(i) for i in range(spec.first_trained_layer, spec.num_layers))
    if patterns in layers_lib.LAYER_PRESETS:  # select_layers takes one regex: join the preset's
        return "|".join(
            "(?:" + p.replace(r"layers\.\d+\.", rf"layers\.({trained})\.") + ")"
            for p in layers_lib.LAYER_PRESETS[patterns]
        )
    frozen = [
        f"layers.{i}.{block}.{proj}"
        for i in range(spec.first_trained_layer)
        for proj, block in lora_lib.PROJECTIONS.items()
    ] + ["lm_head", "embed_tokens"]
    for path in frozen:
        if re.fullmatch(patterns, path):
            raise InputError(
                f"{patterns!r} selects {path}, which train.finetuning=freeze keeps frozen "
                f"(decoder layers {spec.first_trained_layer}..{spec.num_layers - 1} train): "
                "influence must be over trained parameters",
                field="curvature.layers",
            )
    return patterns


def _lora_layers(spec: Finetuning, patterns: str) -> str:
    """LoRA: a preset (mlp, attention, all_linear) becomes the adapters of its projections, `lora`
    every adapter; regexes are kept. InputError (curvature.layers) when the result selects a base
    weight or no adapter of train.lora_targets."""
    adapters = [
        f"lora.layers.{i}.{lora_lib.PROJECTIONS[proj]}.{proj}.lora_{ab}"
        for i in range(spec.num_layers)
        for proj in spec.targets
        for ab in "ab"
    ]
    base = [
        f"layers.{i}.{block}.{proj}"
        for i in range(spec.num_layers)
        for proj, block in lora_lib.PROJECTIONS.items()
    ] + ["lm_head", "embed_tokens"]
    resolved = patterns
    if patterns in layers_lib.LAYER_PRESETS:
        resolved = "|".join(
            f"(?:{p})" if p.startswith("lora") else rf"(?:lora\.{p}\.lora_[ab])"
            for p in layers_lib.LAYER_PRESETS[patterns]
        )
    chosen_base = [p for p in base if re.fullmatch(resolved, p)]
    if chosen_base or not any(re.fullmatch(resolved, p) for p in adapters):
        what = (
            f"selects the frozen base weight {chosen_base[0]}"
            if chosen_base
            else f"selects no adapter of train.lora_targets ({', '.join(spec.targets)})"
        )
        raise InputError(
            f"{patterns!r} {what}: with train.finetuning=lora, influence is over the adapters "
            "(a preset such as mlp or lora, or regexes over "
            "'lora.layers.N.<block>.<proj>.lora_a|b')",
            field="curvature.layers",
        )
    return resolved


def check_config(cfg: Any) -> None:
    """train.finetuning's fields (train/finetuning.check_config) and, with freeze or lora, the
    curvature layers against the trained parameters: InputError naming the field, before the
    workdir exists."""
    spec = finetuning_lib.check_config(cfg)
    if spec is not None and cfg.get("mode") in finetuning_lib.INFLUENCE_MODES:
        curvature_layers(spec, cfg.get("curvature", {}).get("layers", "mlp"))


def with_trained_curvature_layers(cfg: Any) -> Any:
    """`cfg` with curvature.layers over exactly the trained parameters when train.finetuning is
    freeze or lora (`curvature_layers`): what a run's stages read (ideal.load_run / rebind).
    `cfg` itself otherwise."""
    train = cfg.get("train") if hasattr(cfg, "get") else None
    if train is None or str(train.get("finetuning", "full")) not in ("freeze", "lora"):
        return cfg
    if cfg.get("mode") not in finetuning_lib.INFLUENCE_MODES:  # no influence stage to steer
        return cfg
    spec = finetuning_lib.from_config(train, finetuning_lib.model_num_layers(cfg.model))
    resolved = curvature_layers(spec, cfg.curvature.layers)
    if resolved == cfg.curvature.layers:
        return cfg
    out = copy.deepcopy(cfg)
    out.curvature.layers = resolved
    return out
