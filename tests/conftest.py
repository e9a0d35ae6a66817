"""Test set-up: the tiers, and the fake CPU devices (set *before* jax is imported anywhere).

Tiers (pyproject.toml's markers):
  python -m pytest                  the unit tier: 2 fake devices, no whole loop, no subprocess
  python -m pytest -m "integration and not slow"
                                    end-to-end runs on the 8-device mesh, sharing one finished run
  python -m pytest -m slow          the long ones (8 devices)

The device count follows the tier that `-m` selects (8 when it names `integration` or `slow`
positively, else 2); IDEAL_JAX_TEST_DEVICES overrides it. Every test has a time limit
(pytest-timeout): 60 s in the unit tier, more for the others (TIMEOUTS below).
"""

import os
import re

import pytest

# Per-test time limits (seconds) by tier. A unit test over its limit belongs in another tier.
TIMEOUTS = {"unit": 60, "integration": 420, "slow": 3600}

# The integration tier: files whose tests need the 8-device mesh (sharded against unsharded),
# run the whole loop or the CLI in a subprocess, share one finished run, execute the notebook or
# generated code in the sandbox, or take over ~15 s of compute each on 2 cores. A test marked
# `integration` in its own file counts too, and so does every test named test_cli* (a CLI
# subprocess). Everything else is the unit tier.
INTEGRATION_FILES = {
    # the 8-device mesh
    "test_activation_sharding.py",
    "test_curvature_placement.py",
    "test_influence_sharding.py",
    "test_memory_plan.py",
    "test_sharding.py",
    "test_train_loop.py",
    "test_train_step.py",
    # whole loops, the CLI, several processes
    "test_cli.py",
    "test_compare.py",
    "test_counterfactual.py",
    "test_daar_job.py",
    "test_daar_pseudo_vs_true.py",
    "test_multiprocess.py",
    "test_notebook.py",
    "test_round_state.py",
    "test_step_policy_loop.py",
    # generated code under bubblewrap
    "test_eval_code_exec.py",
    "test_sandbox_escapes.py",
    # heavy compute (language-model curvature and influence passes end to end)
    "test_cg_preconditioning.py",
    "test_outer_objective.py",
    "test_outer_objective_lm.py",
    "test_outer_rule_known_answer.py",
    "test_prefix_cache.py",
    "test_smollm2_loss_rows.py",
    "test_analyzer.py",  # a fitted EK-FAC analysis shared by its tests (~45 s cold)
    "test_daar_pipeline.py",  # a trained DaaR probe shared by its tests (~15 s cold)
}


def _tier_device_count(markexpr: str) -> int:
    if os.environ.get("IDEAL_JAX_TEST_DEVICES"):
        return int(os.environ["IDEAL_JAX_TEST_DEVICES"])
    positive = re.sub(r"not\s+(integration|slow)", "", markexpr or "")
    return 8 if re.search(r"\b(integration|slow)\b", positive) else 2


def pytest_configure(config):
    n = _tier_device_count(config.option.markexpr)
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # One persistent compilation cache for the session and the subprocesses it starts.
    cache = os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax_cache"),
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tier(item) -> str:
    if item.get_closest_marker("slow") is not None:
        return "slow"
    if (
        item.get_closest_marker("integration") is not None
        or os.path.basename(str(item.fspath)) in INTEGRATION_FILES
        or item.name.startswith("test_cli")
    ):
        return "integration"
    return "unit"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the markers added here
def pytest_collection_modifyitems(config, items):
    for item in items:
        if tier(item) == "integration" and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("timeout") is not None:
            continue
        if item.get_closest_marker("slow") is not None:
            limit = TIMEOUTS["slow"]
        elif item.get_closest_marker("integration") is not None:
            limit = TIMEOUTS["integration"]
        else:
            limit = TIMEOUTS["unit"]
        item.add_marker(pytest.mark.timeout(limit))
