"""Fine-tuning types (LLaMA-Factory's names): which parameters a training run updates.

    full    every parameter.
    freeze  the top `train.freeze_trainable_layers` = N decoder layers (all their modules); the
            embedding, the layers below, the final norm and the LM head stay frozen, as in
            LLaMA-Factory's `finetuning_type: freeze` without `freeze_extra_modules`. The frozen
            layers' output is computed once per example and reused (train/prefix_cache.py).
    lora    rank-`train.lora_rank` adapters (scale `train.lora_alpha` / rank) on the projections
            named by `train.lora_targets` in every decoder layer; the base model stays frozen
            (ideal_jax/model/lora.py). The stages after training see params["lora"]: evaluation
            runs the adapted model, influence is over the adapters (curvature/trained.py),
            exported models carry the adapters merged into the weights.

A `Finetuning` splits the parameter tree into (trainable, frozen) subtrees that keep their paths
from the root (so the optimizer state shards like its parameters) and joins them back. Frozen
leaves are never touched by an update: they stay bit-identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ideal_jax.model import lora as lora_lib
from ideal_jax.model.transformer import LORA_KEY
from ideal_jax.utils.errors import InputError

KINDS = ("full", "freeze", "lora")
# Modes whose rounds compute influence over the trained parameters.
INFLUENCE_MODES = ("ideal", "influence", "compare")


@dataclasses.dataclass(frozen=True)
class Finetuning:
    kind: str = "full"
    num_layers: int = 0  # the model's decoder layers
    trainable_layers: int = 0  # freeze: the top N decoder layers train
    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ()

    @property
    def first_trained_layer(self) -> int:
        """freeze: the lowest trained decoder layer (the layers below it are the frozen prefix);
        0 otherwise."""
        return self.num_layers - self.trainable_layers if self.kind == "freeze" else 0

    def is_trained(self, path: tuple) -> bool:
        """Whether the parameter at `path` (keys from the root) is updated by training."""
        if self.kind == "full":
            return True
        if self.kind == "freeze":
            return (
                len(path) > 1 and path[0] == "layers" and int(path[1]) >= self.first_trained_layer
            )
        return len(path) > 1 and path[0] == LORA_KEY and path[1] == "layers"

    def split(self, params: Mapping) -> tuple[dict, dict]:
        """(trainable, frozen): two subtrees of `params` with their paths kept."""
        return _select(params, (), self.is_trained, True), _select(
            params, (), self.is_trained, False
        )

    def join(self, trainable: Mapping, frozen: Mapping) -> dict:
        return _join(trainable, frozen)

    def trainable(self, params: Mapping) -> dict:
        return _select(params, (), self.is_trained, True)

    def to_json(self) -> dict[str, Any]:
        out = {"finetuning": self.kind}
        if self.kind == "freeze":
            out["trainable_layers"] = self.trainable_layers
        if self.kind == "lora":
            out.update(rank=self.rank, alpha=self.alpha, targets=list(self.targets))
        return out


def _key(k: Any) -> Any:
    return int(k) if isinstance(k, str) and k.isdigit() else k


def _select(node: Any, path: tuple, keep, want: bool) -> Any:
    """The subtree of `node` whose leaves have keep(path) == want (empty dicts dropped)."""
    if not isinstance(node, Mapping):
        return node
    out = {}
    for k, child in node.items():
        sub = (*path, _key(k))
        if isinstance(child, Mapping):
            picked = _select(child, sub, keep, want)
            if picked:
                out[k] = picked
        elif child is not None and keep(sub) == want:
            out[k] = child
    return out


def _join(a: Any, b: Any) -> Any:
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise ValueError("trainable and frozen parameters overlap")
    out = dict(b)
    for k, v in a.items():
        out[k] = _join(v, b[k]) if k in b else v
    return out


def from_config(train_cfg: Any, num_layers: int) -> Finetuning:
    """The fine-tuning type of cfg.train for a model of `num_layers` decoder layers; InputError
    naming the field when it cannot apply (N outside 1..num_layers, a LoRA target that names no
    projection, rank <= 0, alpha <= 0)."""
    kind = str(train_cfg.get("finetuning", "full"))
    if kind not in KINDS:
        raise InputError(
            f"{kind!r} is not allowed; allowed: {', '.join(KINDS)}", field="train.finetuning"
        )
    if kind == "full":
        return Finetuning("full", num_layers)
    if kind == "freeze":
        n = train_cfg.get("freeze_trainable_layers", 0)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_layers:
            raise InputError(
                f"must be an integer in 1..{num_layers} (the model's decoder layers), got {n!r}",
                field="train.freeze_trainable_layers",
            )
        return Finetuning("freeze", num_layers, trainable_layers=n)
    rank, alpha = train_cfg.get("lora_rank", 0), train_cfg.get("lora_alpha", 0.0)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InputError(f"must be an integer >= 1, got {rank!r}", field="train.lora_rank")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise InputError(f"must be > 0, got {alpha!r}", field="train.lora_alpha")
    targets = lora_lib.parse_targets(train_cfg.get("lora_targets", "all"))
    unknown = lora_lib.unknown_targets(targets)
    if unknown or not targets:
        raise InputError(
            f"{', '.join(unknown) or 'nothing'} matches no projection; allowed: all, or a "
            f"comma-separated subset of {', '.join(lora_lib.PROJECTIONS)}",
            field="train.lora_targets",
        )
    return Finetuning("lora", num_layers, rank=rank, alpha=float(alpha), targets=targets)


def model_num_layers(model_section: Any) -> int:
    """The decoder layers of cfg.model without loading weights (the checkpoint's config.json,
    the .gguf header, or the preset)."""
    from ideal_jax.model import config as model_config
    from ideal_jax.model import hf_io

    if model_section.get("path"):
        return int(hf_io.load_hf_config(model_section.path).num_layers)
    return int(model_config.preset(model_section.preset, vocab_size=8).num_layers)


def check_config(cfg: Any) -> Finetuning | None:
    """The fine-tuning fields of a whole config, before its workdir is touched (through
    curvature/trained.check_config, from main.check_config): from_config's checks against the
    model's layer count, and LoRA with a mode that computes influence where the curvature layer
    groups would be planned for an accelerator's memory (memory_plan.py knows the model's layers,
    not the adapters): refused, InputError on train.finetuning."""
    train = cfg.get("train") if hasattr(cfg, "get") else None
    if train is None or str(train.get("finetuning", "full")) == "full":
        if train is not None:
            from_config(train, 1)  # the kind itself
        return None
    spec = from_config(train, model_num_layers(cfg.model))
    if spec.kind == "lora" and cfg.get("mode") in INFLUENCE_MODES and _plans_layer_groups(cfg):
        raise InputError(
            f"mode={cfg.get('mode')} computes influence over the LoRA adapters, and on an "
            "accelerator (or with curvature.device_memory_gib set) the curvature layer groups are "
            "planned by memory_plan.py, which does not know adapter layers yet; use "
            "train.finetuning=freeze or full there, or mode=sft",
            field="train.finetuning",
        )
    return spec


def _plans_layer_groups(cfg: Any) -> bool:
    """Whether the influence stage will plan curvature layer groups by device memory
    (influence/stage.device_memory_bytes is not None)."""
    import jax

    if cfg.get("curvature", {}).get("device_memory_gib", 0):
        return True
    return jax.devices()[0].platform != "cpu"


def merged_params(params: Mapping, model_cfg: Any, mesh: Any) -> dict:
    """LoRA: the adapters merged into the base weights (W + scale · A B), sharded like the base
    model; what the stages after training (evaluation, influence, export) see."""
    import jax

    from ideal_jax import sharding
    from ideal_jax.model.transformer import abstract_params, logical_axes

    out_sh = sharding.param_shardings(abstract_params(model_cfg), logical_axes(model_cfg), mesh)
    return jax.jit(lora_lib.merge, out_shardings=out_sh)(params)
