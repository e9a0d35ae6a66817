"""cfg.daar as a typed, validated value: `DaarConfig.from_section(cfg.daar)`.

configs/common.py's cfg.daar is the one place the defaults (and their meanings) live: DaarConfig
has no defaults of its own, and a field missing from the section is an InputError naming it.
docs/method_choices.md (DaaR) says where the defaults differ from the paper and what was measured.

`STAGE_FIELDS` names the fields each stage of the pipeline reads; an artifact is fingerprinted with
those only (DaarConfig.fingerprint), so e.g. a new selection variant reuses the trained probes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ideal_jax.configlib.checks import section_fields
from ideal_jax.daar import centroids as cen
from ideal_jax.daar import kmeans as km
from ideal_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    name: str
    description: str  # one sentence, shown to the generator
    tau: float  # similarity threshold for accepting a generated pair


def _tau(domain: str, tau: Any) -> float:
    """The domain's τ: given, else the paper's 0.9 for math and 0.85 for the rest; in (0, 1]."""
    if tau is None:
        return 0.9 if "math" in domain.lower() else 0.85
    try:
        value = float(tau)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise InputError(
            f"domain {domain!r}: tau (the similarity threshold) must be in (0, 1], got {tau!r}",
            field=f"daar.tau.{domain}",
        )
    return value


_EMBED = ("centroid_source", "centroid_layer", "max_len", "embed_batch_size")
_FEATURES = ("feature_layer", "feature_norm", "max_len", "embed_batch_size")
# The DaarConfig fields each stage's artifact depends on (upstream artifacts enter through their
# content, provenance.with_upstream). tests/test_daar_config.py: every field is in one of them.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "generate": (
        "domains",
        "seeds_per_domain",
        "target_per_domain",
        "min_per_domain",
        "max_attempts_per_domain",
        "counter_examples",
        "seed_temperature",
        "augment_temperature",
        "top_p",
        "max_new_tokens",
        "seed",
        *_EMBED,  # τ-filtering embeds the generated pairs
    ),
    "centroids": _EMBED,
    "pseudo_labels": (*_EMBED, "kmeans_metric", "kmeans_max_iters"),
    "probes": (
        *_FEATURES,
        "probe_lr",
        "probe_epochs",
        "probe_batch_size",
        "probe_hidden",
        "probe_val_fraction",
        "probe_weight_decay",
        "probe_patience",
        "probe_cross_fit_folds",
        "seed",
    ),
    "scores": _FEATURES,
    "select": (
        "domains",
        "select_fraction",
        "select_method",
        "customized_target",
        "customized_fractions",
        "seed",
    ),
}


@dataclasses.dataclass(frozen=True)
class DaarConfig:
    """Every field is a cfg.daar field (meanings and defaults: configs/common.py)."""

    domains: tuple[DomainSpec, ...]  # cfg.daar.domains (name -> description) and cfg.daar.tau
    seeds_per_domain: int
    target_per_domain: int
    min_per_domain: int  # fewer accepted pairs when the budget is spent: InputError
    max_attempts_per_domain: int  # every generation counts, parseable or not
    counter_examples: int
    seed_temperature: float
    augment_temperature: float
    top_p: float
    max_new_tokens: int
    centroid_source: str
    centroid_layer: int
    feature_layer: int
    feature_norm: bool
    max_len: int
    embed_batch_size: int
    kmeans_metric: str
    kmeans_max_iters: int
    probe_lr: float
    probe_epochs: int
    probe_batch_size: int
    probe_hidden: tuple[int, ...]  # (): the paper's 2d, d, d/2, 256
    probe_val_fraction: float
    probe_weight_decay: float
    probe_patience: int
    probe_cross_fit_folds: int
    select_fraction: float
    select_method: str
    customized_target: str | None  # cfg.daar's "" is None
    customized_fractions: tuple[float, float]
    seed: int

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    @classmethod
    def from_section(cls, section: Any) -> DaarConfig:
        """From cfg.daar (an ml_collections section or a dict of the same shape: descriptions and
        τ keyed by domain name). A missing field or a bad value raises InputError naming it."""
        values = section_fields(section, cls, "daar", exclude=("domains",))
        names = [f.name for f in dataclasses.fields(cls) if f.name != "domains"]
        descriptions = dict(values.get("domains") or {})
        taus = dict(values.get("tau") or {})
        unknown = sorted(set(taus) - set(descriptions))
        if unknown:
            raise InputError(f"τ given for unknown domains {unknown}", field="daar.tau")
        if not descriptions:
            raise InputError(
                "at least one domain {name: one-sentence description} is required (the domain "
                "description list is empty)",
                field="daar.domains",
            )
        domains = []
        for name, description in descriptions.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"domain {name!r} needs a non-empty name", field="daar.domains")
            if not isinstance(description, str) or not description.strip():
                raise InputError(
                    f"domain {name!r} needs a non-empty one-sentence description",
                    field=f"daar.domains.{name}",
                )
            domains.append(DomainSpec(name, description, _tau(name, taus.get(name))))
        kwargs = {name: values[name] for name in names}
        kwargs["probe_hidden"] = tuple(kwargs["probe_hidden"] or ())
        kwargs["customized_fractions"] = tuple(kwargs["customized_fractions"])
        kwargs["customized_target"] = kwargs["customized_target"] or None
        cfg = cls(domains=tuple(domains), **kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """InputError naming the first cfg.daar field whose value cannot work."""
        if self.customized_target is not None and self.customized_target not in self.domain_names:
            raise InputError(
                f"customized_target {self.customized_target!r} is not one of {self.domain_names}",
                field="daar.customized_target",
            )
        choices = {
            "select_method": ("top_fraction", "per_domain"),
            "kmeans_metric": km.METRICS,
            "centroid_source": cen.SOURCES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}",
                    field=f"daar.{name}",
                )
        ranges = {
            "select_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "probe_val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "probe_lr": (lambda v: v > 0, "> 0"),
            "probe_weight_decay": (lambda v: v >= 0, ">= 0"),
            "probe_epochs": (lambda v: v >= 1, ">= 1"),
            "probe_batch_size": (lambda v: v >= 1, ">= 1"),
            "probe_patience": (lambda v: v >= 0, ">= 0"),
            "probe_cross_fit_folds": (lambda v: v == 0 or v >= 2, "0 (off) or >= 2"),
            "seeds_per_domain": (lambda v: v >= 1, ">= 1"),
            "max_attempts_per_domain": (lambda v: v >= 1, ">= 1"),
            "counter_examples": (lambda v: v >= 1, ">= 1"),
            "seed_temperature": (lambda v: v >= 0, ">= 0"),
            "augment_temperature": (lambda v: v >= 0, ">= 0"),
            "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "max_new_tokens": (lambda v: v >= 1, ">= 1"),
            "max_len": (lambda v: v >= 1, ">= 1"),
            "embed_batch_size": (lambda v: v >= 1, ">= 1"),
            "kmeans_max_iters": (lambda v: v >= 1, ">= 1"),
            "centroid_layer": (lambda v: v >= 0, ">= 0"),
        }
        for name, (check, what) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not check(value):
                raise InputError(f"must be {what}, got {value!r}", field=f"daar.{name}")
        if self.probe_patience > 0 and self.probe_val_fraction == 0:
            raise InputError(
                "early stopping needs a validation split: set probe_val_fraction > 0",
                field="daar.probe_patience",
            )
        if not all(0 < f <= 1 for f in self.customized_fractions):
            raise InputError("both fractions must be in (0, 1]", field="daar.customized_fractions")
        if not 1 <= self.min_per_domain <= self.target_per_domain:
            raise InputError(
                "need 1 <= min_per_domain <= target_per_domain", field="daar.min_per_domain"
            )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self, stage: str) -> str:
        """Digest of the fields `stage` reads (STAGE_FIELDS)."""
        values = self.to_dict()
        chosen = {name: values[name] for name in STAGE_FIELDS[stage]}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:12]

    def generation_kwargs(self) -> dict[str, Any]:
        """Arguments of `generation.generate_domain_pairs` besides the domain itself."""
        names = ("counter_examples", "seed_temperature", "augment_temperature", "top_p")
        return dict(
            seeds=self.seeds_per_domain,
            target=self.target_per_domain,
            min_accepted=self.min_per_domain,
            max_attempts=self.max_attempts_per_domain,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            **{name: getattr(self, name) for name in names},
        )

    def probe_kwargs(self) -> dict[str, Any]:
        """`probes.train_probe` settings (both probes and every cross-fit fold)."""
        return dict(
            hidden=self.probe_hidden or None,
            lr=self.probe_lr,
            epochs=self.probe_epochs,
            batch_size=self.probe_batch_size,
            val_fraction=self.probe_val_fraction,
            weight_decay=self.probe_weight_decay,
            patience=self.probe_patience,
            seed=self.seed,
        )
