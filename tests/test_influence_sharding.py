"""Sharded (8 fake CPU devices, mesh data×fsdp, AxisType.Auto) equals single-device results."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_curvature_models import classification_batches, mlp_params, mlp_problem

from ideal_jax.curvature import ekfac as ekfac_lib
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import operators
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients

SIZES = (6, 16, 5)
DOMAINS = ("d0", "d1", "d2", "d3")


def _pipeline(params, train, reference):
    problem = mlp_problem(params)
    curvature = kfac_lib.KfacCurvature(problem, "empirical")
    state = kfac_lib.accumulate_factors(curvature, params, train, jax.random.key(0))
    state = ekfac_lib.fit_eigen_correction(curvature, state, params, train, jax.random.key(1))
    dom = gradients.group_mean_gradients(problem, params, train, DOMAINS)
    ref = gradients.group_mean_gradients(problem, params, reference, ("c0", "c1"))
    # factors A, G and Λ* (eigenvectors themselves are only defined up to sign/rotation)
    out = {
        "factors": [[f.value for f in b.factors] for b in state.kfac.blocks_states],
        "correction": state.correction,
    }
    for name in ("kfac", "ekfac"):
        op = operators.build_operator(
            name,
            problem=problem,
            params=params,
            curvature=curvature,
            state=state,
            damping=0.1,
            relative_damping=True,
        )
        out[name + "_product"] = op(ref.overall)
        out[name + "_alpha"] = alpha_lib.compute_alpha(ref, dom, op, layers=problem.layers).matrix
    return out


@pytest.mark.slow
def test_sharded_equals_single_device():
    assert jax.device_count() == 8
    params = mlp_params(SIZES)
    train = classification_batches(SIZES, 3, 32, num_domains=4, seed=1)
    reference = [
        {**b, "domain_ids": b["domain_ids"] % 2}
        for b in classification_batches(SIZES, 1, 32, 4, seed=5)
    ]
    single = _pipeline(params, train, reference)

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    put = lambda bs: [jax.tree.map(lambda x: jax.device_put(x, rows), b) for b in bs]
    fsdp = lambda x: jax.device_put(
        x, NamedSharding(mesh, P("fsdp") if x.ndim == 2 and x.shape[0] % 2 == 0 else P())
    )
    with jax.set_mesh(mesh):
        sharded = _pipeline(jax.tree.map(fsdp, params), put(train), put(reference))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())
