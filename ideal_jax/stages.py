"""Every stage's typed config, built once from a loaded config: `load(cfg)` is the one check a
config gets before any work (ideal_jax/main.py), each typed config checking its own choices and
ranges; the sections that have no typed config yet are checked by configlib/checks.py's tables.

  cfg.reweight  → ReweightConfig (ideal_jax/reweight.py; the rule names: reweight.RULES)
                  and PolicyConfig (ideal_jax/step_policy.py; m, its bounds, accept_on)
  cfg.compare   → CompareConfig (ideal_jax/compare/config.py; the methods: compare/methods.py)
  cfg.daar      → DaarConfig (ideal_jax/daar/config.py; built by mode=daar and use_for_ideal)
"""

from __future__ import annotations

import dataclasses

from ideal_jax import reweight, step_policy
from ideal_jax.compare.config import CompareConfig
from ideal_jax.configlib.checks import validate_config


@dataclasses.dataclass(frozen=True)
class StageConfigs:
    reweight: reweight.ReweightConfig
    policy: step_policy.PolicyConfig
    compare: CompareConfig


def load(cfg) -> StageConfigs:
    """Check `cfg` (InputError naming the field) and build its typed stage configs."""
    validate_config(cfg)
    return StageConfigs(
        reweight=reweight.ReweightConfig.from_config_dict(cfg.reweight),
        policy=step_policy.PolicyConfig.from_config_dict(cfg.reweight),
        compare=CompareConfig.from_config_dict(cfg.compare),
    )
