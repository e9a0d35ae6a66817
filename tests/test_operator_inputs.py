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
        operators.build_operator(name, problem=problem, params={}, batches=None)
        asked_for_batches = False
    except InputError as e:
        asked_for_batches = "needs the training batches" in str(e)
    except Exception:  # failed later, on the empty problem: it did not ask for batches
        asked_for_batches = False
    assert asked_for_batches == operators.needs_batches(name)
