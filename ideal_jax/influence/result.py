"""What the influence stage returns: a typed result, serialised to influence.json only at the edge.

`RoundInfluence` holds α (combined over layer groups), each group's own part (its layers, α
contribution, damping, solver info and, when asked, its operator and gradients), the subsample it
was measured on, timings, and — for the outer rule — the round's outer objective problem. Layer
groups combine as objects: H is block-diagonal over layers, so α is the sum of the groups'
contributions (`combine_groups`). `to_json` writes the influence.json layout; `from_json` reads it
back (a resumed round: α and its metadata, without the in-memory operator and gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ideal_jax.influence.alpha import InfluenceResult
from ideal_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class GroupInfluence:
    """One layer group's part of the stage (H restricted to these layers)."""

    alpha: InfluenceResult  # this group's contribution to every α entry
    operator_info: dict | None = None  # e.g. cg: iterations and residuals
    operator: Any = None  # the InverseOperator (kept when the caller asked for it)
    domain_gradients: Any = None  # GroupGradients over the domains (kept when asked)
    reference_gradients: Any = None  # GroupGradients over the capabilities (kept when asked)


def combine_groups(parts: Sequence[InfluenceResult], stderr=None) -> InfluenceResult:
    """α over all layers from the groups' parts: matrices add, dampings and layers merge."""
    if not parts:
        raise ValueError("no layer groups")
    first = parts[0]
    for p in parts[1:]:
        if p.rows != first.rows or p.domains != first.domains or p.scaling != first.scaling:
            raise ValueError("layer groups disagree on rows, domains or scaling")
    return dataclasses.replace(
        first,
        matrix=np.sum([np.asarray(p.matrix) for p in parts], axis=0),
        damping={k: v for p in parts for k, v in p.damping.items()},
        layers=tuple(layer for p in parts for layer in p.layers),
        stderr=stderr,
    )


@dataclasses.dataclass(frozen=True)
class RoundInfluence:
    """The influence stage's result for one round."""

    alpha: InfluenceResult  # over all layer groups, with standard errors
    groups: tuple[GroupInfluence, ...]
    estimator: str
    relative_damping: bool
    correction: str | None
    subsample: dict
    subsample_examples: int
    seq_len: int
    timings: dict
    outer_problem: Any = None  # outer_objective.OuterProblem, rule "outer" only (not serialised)

    def row(self, name: str = "all") -> np.ndarray:
        return np.asarray(self.alpha.row(name))

    def stderr_row(self, name: str = "all") -> np.ndarray | None:
        if self.alpha.stderr is None:
            return None
        return np.asarray(self.alpha.stderr[self.alpha.rows.index(name)], float)

    def check_domains(self, domain_names: Sequence[str], path: str | None = None) -> None:
        if list(self.alpha.domains) != list(domain_names):
            raise InputError(
                f"influence.json columns {list(self.alpha.domains)} are not the mixture's "
                f"domains {list(domain_names)}",
                path=path,
                field="domains",
            )

    def to_json(self) -> dict:
        out = self.alpha.to_json()
        out.update(
            layer_groups=[list(g.alpha.layers) for g in self.groups],
            estimator=self.estimator,
            relative_damping=self.relative_damping,
            correction=self.correction,
            subsample_examples=self.subsample_examples,
            subsample=self.subsample,
            seq_len=self.seq_len,
            timings=self.timings,
        )
        info = {",".join(g.alpha.layers): g.operator_info for g in self.groups if g.operator_info}
        if info:
            out["operator_info"] = info
        return out

    @classmethod
    def from_json(cls, d: dict, path: str | None = None) -> RoundInfluence:
        """A result read back from influence.json (no in-memory operator or gradients)."""
        try:
            stderr = d.get("stderr")
            alpha = InfluenceResult(
                matrix=np.asarray(d["matrix"], np.float64),
                rows=tuple(d["rows"]),
                domains=tuple(d["domains"]),
                operator=d["operator"],
                damping=dict(d["damping"]),
                layers=tuple(d["layers"]),
                scaling=d["scaling"],
                sigma=d.get("sigma"),
                domain_sizes=tuple(d["domain_sizes"]),
                reference_weighting=d.get("reference_weighting", "capability"),
                stderr=None
                if stderr is None
                else np.asarray([[np.nan if x is None else x for x in r] for r in stderr]),
            )
            info = d.get("operator_info") or {}
            groups = tuple(
                GroupInfluence(
                    alpha=dataclasses.replace(
                        alpha,
                        matrix=np.full_like(alpha.matrix, np.nan),  # parts are not stored
                        layers=tuple(g),
                        damping={k: v for k, v in alpha.damping.items() if k in g},
                        stderr=None,
                    ),
                    operator_info=info.get(",".join(g)),
                )
                for g in d.get("layer_groups", [d["layers"]])
            )
            return cls(
                alpha=alpha,
                groups=groups,
                estimator=d["estimator"],
                relative_damping=bool(d["relative_damping"]),
                correction=d.get("correction"),
                subsample=dict(d["subsample"]),
                subsample_examples=int(d["subsample_examples"]),
                seq_len=int(d["seq_len"]),
                timings=dict(d["timings"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"influence.json is missing or has a malformed field ({e!r}); delete it to "
                "recompute",
                path=path,
                field=str(e.args[0]) if isinstance(e, KeyError) else None,
            ) from None
