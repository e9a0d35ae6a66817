"""Every inverse operator is given what it needs: the influence stage passes the training
batches exactly to the operators that are built from them (operators.needs_batches)."""

import pytest

from ideal_jax.curvature import operators
from ideal_jax.curvature.problem import CurvatureProblem
from ideal_jax.utils.errors import InputError


@pytest.mark.parametrize("name", operators.OPERATORS)
def test_needs_batches_names_exactly_the_operators_built_from_batches(name):
    problem = CurvatureProblem.__new__(CurvatureProblem)  # never used before the check
    object.__setattr__(problem, "layers", ())
    try:
        operators.build_operator(
            name,
            problem=problem,
            params={},
            batches=None,
            damping=0.1,
            relative_damping=True,
            cg_tol=1e-6,
            cg_max_iters=200,
        )
        asked_for_batches = False
    except InputError as e:
        asked_for_batches = "needs the training batches" in str(e)
    except Exception:  # failed later, on the empty problem: it did not ask for batches
        asked_for_batches = False
    assert asked_for_batches == operators.needs_batches(name)


@pytest.mark.parametrize("name", [n for n in operators.OPERATORS if n != "identity"])
def test_damping_and_the_cg_settings_have_no_library_default(name):
    """configs/common.py is their one home: an operator built without them is refused."""
    problem = CurvatureProblem.__new__(CurvatureProblem)
    object.__setattr__(problem, "layers", ())
    with pytest.raises(TypeError, match="damping"):
        operators.build_operator(name, problem=problem, params={}, batches=None)
    if name.startswith("cg"):
        with pytest.raises(TypeError, match="cg_tol, cg_max_iters"):
            operators.build_operator(
                name, problem=problem, params={}, damping=0.1, relative_damping=True
            )


def test_batches_may_be_a_function_called_only_by_the_operators_that_need_them():
    import jax
    import numpy as np
    from test_curvature_models import classification_batches, mlp_params, mlp_problem

    from ideal_jax.curvature import layers as layers_lib

    sizes = (6, 8, 5)
    params = mlp_params(sizes)
    problem = mlp_problem(params)
    batches = classification_batches(sizes, 2, 16, num_domains=2, seed=1)
    calls = []

    def batches_fn():
        calls.append(1)
        return iter(batches)

    from_list = operators.build_operator(
        "exact", problem=problem, params=params, batches=batches, damping=0.1, relative_damping=True
    )
    from_fn = operators.build_operator(
        "exact",
        problem=problem,
        params=params,
        batches=batches_fn,
        damping=0.1,
        relative_damping=True,
    )
    assert calls == [1]
    selected, _ = layers_lib.split_params(params, problem.layers)
    v = jax.tree.map(lambda x: np.ones_like(x), selected)
    for a, b in zip(jax.tree.leaves(from_list(v)), jax.tree.leaves(from_fn(v))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    operators.build_operator("identity", problem=problem, params=params, batches=batches_fn)
    assert calls == [1]  # not asked for by an operator that does not need them
