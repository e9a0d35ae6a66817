"""The methods mode=compare knows (light: configlib validates the config with it)."""

from __future__ import annotations

from ideal_jax.utils.errors import InputError

METHODS = ("ideal", "d0", "uniform", "random", "regmix", "doremi")


def parse_methods(cfg) -> tuple[str, ...]:
    """cfg.compare.methods ("ideal,uniform,...") in METHODS order, with d0 (the pairing base)."""
    names = [m.strip() for m in str(cfg.compare.methods).split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise InputError(
            (f"unknown method {unknown[0]!r}" if unknown else "no method named")
            + f"; allowed: {', '.join(METHODS)} (comma-separated)",
            field="compare.methods",
        )
    return tuple(m for m in METHODS if m in names or m == "d0")
