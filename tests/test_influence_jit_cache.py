"""The influence passes are traced once per process, not once per call (chex.assert_max_traces)."""

import chex
import jax
import numpy as np
from test_curvature_models import classification_batches, mlp_params, mlp_problem

from ideal_jax.influence import gradients, per_example


def test_scores_and_gradients_are_traced_once(monkeypatch):
    sizes = (5, 7, 3)
    params = mlp_params(sizes)
    problem = mlp_problem(params)
    batches = classification_batches(sizes, 2, 8)
    v = jax.tree.map(np.ones_like, {p: params[p] for p in problem.layers})
    caches = (per_example._scores_jit, gradients._group_jit, gradients._contributions_jit)
    for module, step in (
        (per_example, "_scores_step"),
        (gradients, "_group_step"),
        (gradients, "_contributions_step"),
    ):
        monkeypatch.setattr(module, step, chex.assert_max_traces(getattr(module, step), n=1))
    for cached in caches:
        cached.cache_clear()
    try:
        for _ in range(3):  # three calls, as three rounds would make: one trace each
            per_example.per_example_scores(problem, params, batches, [v, v])
            gradients.group_mean_gradients(problem, params, batches, ("a", "b", "c", "d"))
            gradients.single_group_gradients_and_contributions(
                problem, params, [(0, b) for b in batches], ("a",), [v]
            )
    finally:  # the cached jits hold the counting wrappers: later tests must not reuse them
        for cached in caches:
            cached.cache_clear()
