"""benchmarks/counterfactual.py end to end: α's prediction of ΔQ vs retraining (slow, minutes).

It asserts only what the measurements justify: the pipeline runs, every predicted and measured
ΔQ and every statistic is finite and in range, and perturbing the data moves Q at all. It does
not assert that α predicts ΔQ: at this size the retrained ΔQ_j are of the order of the SGD-noise
floor (see the report printed by `python benchmarks/counterfactual.py`).
"""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark():
    """benchmarks/ is not a package: load the script as a module."""
    path = os.path.join(ROOT, "benchmarks", "counterfactual.py")
    spec = importlib.util.spec_from_file_location("counterfactual", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_counterfactual_runs_and_reports_finite_statistics(tmp_path):
    cf = _load_benchmark()
    cfg = cf.make_config(scale=1, epochs=1)
    assert (cfg.influence.operator, cfg.influence.scaling) == ("ekfac", "paper")
    res = cf.run_counterfactual(
        cfg, str(tmp_path), beta=0.3, noise_seeds=1, operator_names=("identity", "ekfac")
    )
    cf.print_report(res)
    n = len(res["domains"])
    assert n == 5 and len(res["actual"]) == n and len(res["noise"]) == 1
    assert np.isfinite(res["q0"]) and np.all(np.isfinite(res["actual"]))
    # A +30 % volume change of any domain changes the trained model, hence Q.
    assert np.all(np.abs(res["actual"]) > 0)
    assert set(res["table"]) == {
        f"{op}/{s}" for op in ("identity", "ekfac") for s in ("paper", "exact")
    }
    for key, row in res["table"].items():
        assert len(row["predicted"]) == n and np.all(np.isfinite(row["predicted"])), key
        for stat in ("pearson", "spearman"):
            assert -1.0 <= row[stat] <= 1.0, (key, stat, row[stat])
        assert 0.0 <= row["sign_agreement"] <= 1.0
    # The benchmark shares one pass between operators; it must be what the IDEAL stage computes.
    from ideal_jax import stages

    model_cfg, params, suite, mix, mesh = res["_state"]
    out = stages.influence_round(cfg, model_cfg, params, suite, mix, mesh)
    key = f"{cfg.influence.operator}/{cfg.influence.scaling}"
    np.testing.assert_allclose(
        res["alpha"][key], out["matrix"][out["rows"].index("all")], rtol=1e-3, atol=1e-6
    )
