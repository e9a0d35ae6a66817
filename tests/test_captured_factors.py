"""The factor pass from the model's captures (kfac.KfacCurvature.captured_factors) against
kfac-jax's own pass: the same A and G with the data's targets, and — with targets sampled from the
model — a Fisher whose average over draws is the exact GGN output factor (kfac-jax's ggn_exact)."""

import dataclasses

import jax
import numpy as np
import pytest
from test_curvature_models import lm_batches, tiny_lm

from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.data import batching


def _problem(params, cfg, layers="mlp", probe=True):
    problem = problem_lib.lm_problem(cfg, layers_lib.select_layers(params, layers))
    assert problem.probe_capture
    return problem if probe else dataclasses.replace(problem, probe_capture=False)


def _factors(curvature, params, batches, seed=0):
    state = kfac_lib.accumulate_factors(curvature, params, batches, jax.random.key(seed))
    out = {}
    for path, bstate in zip(curvature.block_paths(), state.kfac.blocks_states):
        out[path] = tuple(np.asarray(f.value) for f in bstate.factors)
    return state, out


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("loss_positions,mode", [(False, "empirical"), (True, "fisher")])
def test_factors_equal_kfac_jax(loss_positions, mode):
    """The data's targets, or targets sampled with the same key (one categorical draw over the
    batch's loss rows, as kfac-jax draws them): the same factors as kfac-jax's own pass."""
    cfg, params = tiny_lm(layers=1)
    batches = lm_batches(cfg.vocab_size, 2, 4, 12)
    if loss_positions:  # the head at K response rows per example, as the influence stage runs it
        batches = [batching.add_loss_positions(b) for b in batches]
    ours = kfac_lib.KfacCurvature(_problem(params, cfg, "all_linear"), mode)
    theirs = kfac_lib.KfacCurvature(_problem(params, cfg, "all_linear", probe=False), mode)
    assert ours.captured_factors and not theirs.captured_factors
    state_o, f_o = _factors(ours, params, batches)
    state_t, f_t = _factors(theirs, params, batches)
    assert set(f_o) == set(f_t) and len(f_o) == 7
    for path in f_t:
        for a, b in zip(f_o[path], f_t[path]):
            assert _rel(a, b) < 1e-5, path
    for key in ("rows", "tokens", "weight"):
        assert float(getattr(state_o, key)) == float(getattr(state_t, key))
    # and the finished operator: eigenbases and K-FAC eigenvalues
    ev_o = ours.kfac_eigenvalues(ours.finalize(state_o))
    ev_t = theirs.kfac_eigenvalues(theirs.finalize(state_t))
    for path in ev_t:
        assert _rel(np.asarray(ev_o[path]), np.asarray(ev_t[path])) < 1e-4, path


@pytest.mark.integration
def test_sampled_fisher_averages_to_the_exact_ggn():
    """E over sampled targets of Σ δδᵀ is the GGN's output factor (softmax CE: J ᵀ(diag p − ppᵀ)J):
    averaged over 300 draws, within sampling error of ggn_exact, and far from the empirical one
    (a peaked model on random targets)."""
    cfg, params = tiny_lm()
    params = jax.tree_util.tree_map_with_path(
        lambda kp, x: x * 6.0 if "lm_head" in jax.tree_util.keystr(kp) else x, params
    )
    batch = lm_batches(cfg.vocab_size, 1, 3, 10)[0]
    fisher = kfac_lib.KfacCurvature(_problem(params, cfg), "fisher")
    exact = kfac_lib.KfacCurvature(_problem(params, cfg, probe=False), "ggn_exact")
    empirical = kfac_lib.KfacCurvature(_problem(params, cfg), "empirical")
    assert fisher.captured_factors and not exact.captured_factors
    _, f_s = _factors(fisher, params, [batch] * 300)
    _, f_x = _factors(exact, params, [batch])
    _, f_e = _factors(empirical, params, [batch])
    for path in f_x:
        np.testing.assert_allclose(f_s[path][0], f_x[path][0], rtol=1e-5, atol=1e-7)
        err, far = _rel(f_s[path][1], f_x[path][1]), _rel(f_e[path][1], f_x[path][1])
        assert err < 0.12, (path, err)
        assert far > 3 * err, (path, err, far)


def test_correction_from_kept_captures_equals_the_second_pass():
    """With the data's targets the factor pass's captures are exactly the correction pass's: Λ*
    from the kept captures equals fit_eigen_correction's own pass (per example and per batch), and
    nothing is kept when the captures outgrow the budget."""
    from ideal_jax.curvature import ekfac

    cfg, params = tiny_lm()
    batches = lm_batches(cfg.vocab_size, 3, 4, 12)
    curvature = kfac_lib.KfacCurvature(_problem(params, cfg), "empirical")
    rng = jax.random.key(3)
    state, kept = kfac_lib.accumulate_factors_keeping(curvature, params, batches, rng, 2**30)
    assert kept is not None and len(kept.batches) == 3
    sizes = [sum(x.size + d.size for x, d in c.values()) * 4 for c, _ in kept.batches]
    assert kept.nbytes == sum(sizes)
    for unit in ("example", "batch"):
        one_pass = ekfac.correction_from_captures(curvature, state, kept, unit=unit)
        two_pass = ekfac.fit_eigen_correction(curvature, state, params, batches, rng, unit=unit)
        assert float(one_pass.correction_weight) == float(two_pass.correction_weight)
        for path, lam in two_pass.correction.items():
            assert _rel(np.asarray(one_pass.correction[path]), np.asarray(lam)) < 1e-5, path
    # the budget: two batches' worth is not enough for three, and 0 keeps nothing
    _, over = kfac_lib.accumulate_factors_keeping(
        curvature, params, batches, rng, sizes[0] + sizes[1]
    )
    _, off = kfac_lib.accumulate_factors_keeping(curvature, params, batches, rng, 0)
    assert over is None and off is None


def test_sampled_targets_keep_no_captures():
    """With the true Fisher the correction draws its own targets (the factor pass's draws fitted
    the eigenbasis; reused, they made a worse preconditioner): nothing is kept."""
    cfg, params = tiny_lm()
    batches = lm_batches(cfg.vocab_size, 1, 4, 12)
    fisher = kfac_lib.KfacCurvature(_problem(params, cfg), "fisher")
    assert fisher.captured_factors
    _, kept = kfac_lib.accumulate_factors_keeping(fisher, params, batches, jax.random.key(0), 2**30)
    assert kept is None
