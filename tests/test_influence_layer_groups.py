"""Curvature in layer groups (when factors would not fit a device) gives the same α as one pass."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from ideal_jax import main


@pytest.mark.slow
def test_layer_groups_give_the_same_alpha(tmp_path):
    alphas, groups, stderrs = [], [], []
    for memory_gib in (0.0, 0.003):  # 0: one group; 3 MB: several groups (how many: mesh size)
        cfg = tiny.get_config()
        cfg.mode, cfg.progress = "influence", False
        cfg.curvature.device_memory_gib = memory_gib
        workdir = str(tmp_path / f"m{memory_gib}")
        main.run(cfg, workdir)
        out = json.load(open(os.path.join(workdir, "round_0", "influence.json")))
        alphas.append(np.asarray(out["matrix"]))
        stderrs.append(np.asarray(out["stderr"], float))
        groups.append(len(out["layer_groups"]))
    assert groups[0] == 1 and groups[1] > 1, groups
    np.testing.assert_allclose(alphas[1], alphas[0], rtol=1e-4, atol=1e-6)
    # standard errors come from per-example terms summed over the groups, not from summed errors
    np.testing.assert_allclose(stderrs[1], stderrs[0], rtol=1e-4, atol=1e-6)
