"""Compatibility shim: makes kfac-jax 0.0.8 run on jax >= 0.9.2.

Why: jax 0.9.2 changed ``Primitive.get_bind_params(params)`` to return only the bind parameters
(call primitives now carry their sub-functions inside them as ``params["subfuns"]``), whereas
kfac-jax 0.0.8's ``tag_graph_matcher.eval_jaxpr_eqn`` still unpacks ``subfuns, bind_params = ...``
and crashes while tracing any loss function. ``tracer.py`` calls it through the module attribute
(``tgm.eval_jaxpr_eqn``), so replacing that attribute is enough.

When to delete this file: as soon as the minimum kfac-jax in setup.py is a release that contains the
upstream fix (the first release after 0.0.8 that evaluates equations with the new
``get_bind_params`` contract). ``needs_patch()`` then returns False and ``apply()`` is a no-op.

Detection is by behaviour, not by version number: we evaluate one trivial jaxpr equation through
kfac-jax's own function and patch only if that raises.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp

_PATCH_MARK = "_ideal_jax_patched"


def _probe_eqn() -> Any:
    """A single jaxpr equation (``x + y``) used to probe kfac-jax's evaluator."""
    zero = jnp.zeros((), jnp.float32)
    closed = jax.make_jaxpr(lambda x, y: x + y)(zero, zero)
    return closed.jaxpr.eqns[0]


def _probe_fails() -> bool:
    """True when kfac-jax's current ``eval_jaxpr_eqn`` cannot evaluate ``1 + 1``."""
    from kfac_jax._src import tag_graph_matcher as tgm

    try:
        out = tgm.eval_jaxpr_eqn(_probe_eqn(), [jnp.ones((), jnp.float32)] * 2)
    except (TypeError, ValueError):
        return True
    return not (len(out) == 1 and float(out[0]) == 2.0)


def needs_patch() -> bool:
    """True when the installed kfac-jax cannot evaluate jaxpr equations with the installed jax."""
    from kfac_jax._src import tag_graph_matcher as tgm

    return not getattr(tgm.eval_jaxpr_eqn, _PATCH_MARK, False) and _probe_fails()


def _split_bind_params(primitive: Any, params: dict) -> tuple[tuple, dict]:
    """Returns ``(subfuns, bind_params)`` under both the old and the new jax contract."""
    result = primitive.get_bind_params(params)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        return tuple(result[0]), result[1]  # jax < 0.9.2: (subfuns, params)
    return (), dict(result)  # jax >= 0.9.2: params only (subfuns, if any, live inside)


def eval_jaxpr_eqn(eqn: Any, in_values: list) -> list:
    """Drop-in replacement for ``kfac_jax._src.tag_graph_matcher.eval_jaxpr_eqn``."""
    subfuns, bind_params = _split_bind_params(eqn.primitive, eqn.params)
    with jex.source_info_util.user_context(eqn.source_info.traceback):
        output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
    return output if isinstance(output, list) else [output]


setattr(eval_jaxpr_eqn, _PATCH_MARK, True)


def apply() -> bool:
    """Patches kfac-jax in place if (and only if) it needs it. Idempotent.

    Returns:
      True if the patch is active after the call (either applied now or earlier), False if the
      installed kfac-jax works with the installed jax as it is.
    """
    from kfac_jax._src import tag_graph_matcher as tgm

    if getattr(tgm.eval_jaxpr_eqn, _PATCH_MARK, False):
        return True
    if not needs_patch():
        return False
    tgm.eval_jaxpr_eqn = eval_jaxpr_eqn
    if _probe_fails():  # the probe must now pass; fail loudly rather than half-patched
        raise RuntimeError("kfac_jax_shim: patch applied but kfac-jax still cannot evaluate jaxprs")
    return True
