"""cfg.compare as a typed, checked value: `CompareConfig.from_config_dict(cfg.compare)`.

Every field is a cfg.compare field; their meanings and defaults live in configs/common.py only.
The method names are the registry's (ideal_jax/compare/methods.py METHODS).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ideal_jax.configlib.checks import check_fields, section_fields
from ideal_jax.utils.errors import InputError

RANGES: dict[str, tuple[Any, str]] = {
    "compare.k": (lambda v: v >= 2 and v == int(v), "an integer >= 2"),
    "compare.dirichlet_concentration": (lambda v: v > 0, "> 0"),
    "compare.regmix_candidates": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "compare.regmix_top": (lambda v: v >= 1 and v == int(v), "an integer >= 1"),
    "compare.doremi_eta": (lambda v: v > 0, "> 0"),
    "compare.doremi_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    methods: tuple[str, ...]  # in registry order, with d0 (the pairing base)
    k: int  # Dirichlet draws
    dirichlet_concentration: float
    regmix_candidates: int
    regmix_top: int
    doremi_eta: float  # η
    doremi_smoothing: float  # c

    @classmethod
    def from_config_dict(cls, section) -> CompareConfig:
        """From cfg.compare; InputError naming a missing field, an unknown method or a value out
        of range."""
        values = section_fields(section, cls, "compare")
        values["methods"] = parse_methods(values["methods"])
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})

    def __post_init__(self):
        check_fields({"compare": dataclasses.asdict(self)}, {}, RANGES)


def parse_methods(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """cfg.compare.methods ("ideal,uniform,...") in registry order, with d0 (the pairing base);
    InputError naming an unknown method."""
    from ideal_jax.compare.methods import METHODS

    if isinstance(value, str):
        names = [m.strip() for m in value.split(",") if m.strip()]
    else:
        names = list(value)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(
            (f"unknown method {unknown[0]!r}" if unknown else "no method named")
            + f"; allowed: {', '.join(METHODS)} (comma-separated)",
            field="compare.methods",
        )
    return tuple(m for m in METHODS if m in names or m == "d0")
