"""Mean loss gradients of the selected layers: reference set (whole + per capability), domains.

Every gradient is a token-weighted mean, ∇L̄_g = Σ_{t∈g} w_t ∇ℓ_t / Σ_{t∈g} w_t, over the tokens
whose group id (batch[group_key], e.g. `domain_ids`: capability index for the reference set, domain
index for training data; −1 for padding) is g. One streamed pass computes all groups at once: a
jitted step adds Σ_t [id_t = g] w_t ∇ℓ_t for every g (vmapped over groups) into an on-device
accumulator; the only host work in the loop is fetching the next batch.

When every batch holds rows of one group only (the influence stage batches each domain and each
capability separately), `single_group_mean_gradients` needs one backward pass per batch instead
of one per group: the batch's gradient is added into row g of the accumulator.

σ-subsampling (METHOD §1.2, cost saving): `sigma_subsample` picks a random σ fraction of each
domain's examples (seeded) — the caller batches those examples for the gradient and factor passes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.problem import Batch, CurvatureProblem, Params, weighted_loss_sum
from ideal_jax.influence import per_example
from ideal_jax.utils import progress
from ideal_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class GroupGradients:
    """Mean gradients per group (leading [G] axis on every leaf) and the group token weights."""

    names: tuple[str, ...]
    grads: dict  # {path: {kernel: [G, D_in, D_out], ...}}
    weights: np.ndarray  # [G] Σ w per group
    overall: dict  # token-weighted mean over all groups (e.g. the whole reference set)
    overall_weight: float

    def row(self, g: int) -> dict:
        return jax.tree.map(lambda x: x[g], self.grads)


def _group_step(
    problem: CurvatureProblem,
    num_groups: int,
    group_key: str,
    acc: dict,
    acc_w: jax.Array,
    params: Params,
    batch: Batch,
):
    selected, rest = layers_lib.split_params(params, problem.layers)
    ids = batch[group_key]

    def group_sum(g):
        masked = {**batch, "weights": batch["weights"] * (ids == g).astype(jnp.float32)}
        fn = lambda s: weighted_loss_sum(problem, layers_lib.merge_params(s, rest), masked)
        grad, w = jax.grad(fn, has_aux=True)(selected)
        return grad, w

    grads, ws = jax.vmap(group_sum)(jnp.arange(num_groups))
    return jax.tree.map(jnp.add, acc, grads), acc_w + ws


def group_mean_gradients(
    problem: CurvatureProblem,
    params: Params,
    batches: Iterable[Batch],
    names: Sequence[str],
    *,
    group_key: str = "domain_ids",
    what: str = "data",
) -> GroupGradients:
    """Token-weighted mean gradient of each group in one streamed pass over `batches`.

    Raises InputError if a group (or everything) has no response tokens.
    """
    names = tuple(names)
    selected, _ = layers_lib.split_params(params, problem.layers)
    acc = jax.tree.map(lambda x: jnp.zeros((len(names), *x.shape), jnp.float32), selected)
    acc_w = jnp.zeros((len(names),), jnp.float32)
    step = _group_jit(problem, len(names), group_key)
    for batch in progress.bar(batches, f"gradients ({what})"):
        acc, acc_w = step(acc, acc_w, params, batch)
    return _finish(names, acc, acc_w, what, group_key)


@functools.lru_cache(maxsize=32)
def _group_jit(problem: CurvatureProblem, num_groups: int, group_key: str):
    """Jitted once per (problem, number of groups, group key) for the process."""
    return jax.jit(
        functools.partial(_group_step, problem, num_groups, group_key), donate_argnums=(0, 1)
    )


def _single_group_step(
    problem: CurvatureProblem,
    acc: dict,
    acc_w: jax.Array,
    group: jax.Array,
    params: Params,
    batch: Batch,
):
    selected, rest = layers_lib.split_params(params, problem.layers)
    fn = lambda s: weighted_loss_sum(problem, layers_lib.merge_params(s, rest), batch)
    grad, w = jax.grad(fn, has_aux=True)(selected)
    acc = jax.tree.map(lambda a, g: a.at[group].add(g), acc, grad)
    return acc, acc_w.at[group].add(w)


@functools.lru_cache(maxsize=32)
def _single_group_jit(problem: CurvatureProblem):
    """Jitted once per problem for the process (IDEAL's rounds reuse the compilation)."""
    return jax.jit(
        lambda a, w, g, p, b: _single_group_step(problem, a, w, g, p, b), donate_argnums=(0, 1)
    )


def single_group_mean_gradients(
    problem: CurvatureProblem,
    params: Params,
    batches: Iterable[tuple[int, Batch]],
    names: Sequence[str],
    *,
    what: str = "data",
) -> GroupGradients:
    """Like `group_mean_gradients` for batches that each hold one group: (group index, batch).

    One backward pass per batch (not one per group), and one compilation for all groups.
    """
    names = tuple(names)
    selected, _ = layers_lib.split_params(params, problem.layers)
    acc = jax.tree.map(lambda x: jnp.zeros((len(names), *x.shape), jnp.float32), selected)
    acc_w = jnp.zeros((len(names),), jnp.float32)
    step = _single_group_jit(problem)
    for group, batch in progress.bar(batches, f"gradients ({what})"):
        acc, acc_w = step(acc, acc_w, jnp.int32(group), params, batch)
    return _finish(names, acc, acc_w, what, "group")


def _contributions_step(problem, acc, acc_w, group, params, batch, vs):
    c_br, w_b, grad = per_example.contributions_and_gradient(problem, params, batch, vs)
    acc = jax.tree.map(lambda a, g: a.at[group].add(g), acc, grad)
    return acc, acc_w.at[group].add(jnp.sum(w_b)), c_br, w_b


@functools.lru_cache(maxsize=32)
def _contributions_jit(problem: CurvatureProblem):
    return jax.jit(functools.partial(_contributions_step, problem), donate_argnums=(0, 1))


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array, whole, on every host."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class ExampleContributions:
    """Per-example terms of α (one entry per example of the pass, in batch order).

    c [N, R] = −v_r · Σ_{t∈n} w_t ∇ℓ_t, w [N] the example's token weight, group [N] its group.
    """

    c: np.ndarray
    w: np.ndarray
    group: np.ndarray


class GradientsAndTerms:
    """Domain gradients fused with the per-example terms of α, accumulated over calls to `add`.

    Each `add` streams batches (one forward + one backward pass each, every batch drawn from one
    group) into on-device sums; `terms()` and `finish()` read what has been added so far, so a
    caller can grow the sample in stages (influence/stage.py's α-error budget) and stop when α's
    standard errors are small enough, paying only for the examples it added.
    """

    def __init__(self, problem: CurvatureProblem, params: Params, names, inverse_vectors):
        self.problem, self.params, self.names = problem, params, tuple(names)
        selected, _ = layers_lib.split_params(params, problem.layers)
        self.acc = jax.tree.map(
            lambda x: jnp.zeros((len(self.names), *x.shape), jnp.float32), selected
        )
        self.acc_w = jnp.zeros((len(self.names),), jnp.float32)
        self.num_rows = len(inverse_vectors)
        self.vs = per_example.stack_vectors(list(inverse_vectors))
        self.step = _contributions_jit(problem)
        self._c, self._w, self._g = [], [], []

    def add(self, batches: Iterable[tuple[int, Batch]], what: str = "data") -> None:
        for group, batch in progress.bar(batches, f"gradients + example terms ({what})"):
            self.acc, self.acc_w, c_br, w_b = self.step(
                self.acc, self.acc_w, jnp.int32(group), self.params, batch, self.vs
            )
            self._c.append(c_br)
            self._w.append(w_b)
            self._g.append(np.full(w_b.shape, group))

    def terms(self) -> ExampleContributions:
        """The per-example terms added so far (padding rows of a batch are not examples)."""
        if not self._w:
            return ExampleContributions(
                np.zeros((0, self.num_rows)), np.zeros((0,)), np.zeros((0,), np.int64)
            )
        # Fetch each batch once: the host copies replace the device arrays.
        self._c = [np.concatenate([_to_host(x) for x in self._c])]
        self._w = [np.concatenate([_to_host(x) for x in self._w])]
        self._g = [np.concatenate(self._g)]
        c, w, g = self._c[0], self._w[0], self._g[0]
        keep = w > 0
        return ExampleContributions(c=c[keep], w=w[keep], group=g[keep])

    def finish(self, what: str = "data") -> GroupGradients:
        return _finish(self.names, self.acc, self.acc_w, what, "group")


def single_group_gradients_and_contributions(
    problem: CurvatureProblem,
    params: Params,
    batches: Iterable[tuple[int, Batch]],
    names: Sequence[str],
    inverse_vectors: Sequence[dict],
    *,
    what: str = "data",
) -> tuple[GroupGradients, ExampleContributions]:
    """`single_group_mean_gradients` fused with the per-example terms −v_r · ∇ℓ_n of α: the same
    one forward + one backward pass per batch gives both (captured layer inputs/gradients)."""
    acc = GradientsAndTerms(problem, params, names, inverse_vectors)
    acc.add(batches, what)
    return acc.finish(what), acc.terms()


def _finish(names, acc, acc_w, what: str, field: str) -> GroupGradients:
    weights = np.asarray(acc_w, np.float64)
    empty = [n for n, w in zip(names, weights) if w <= 0]
    if empty:
        raise InputError(
            f"{what}: groups {empty} have no response tokens (weights all 0)", field=field
        )
    total = float(weights.sum())
    grads = jax.tree.map(
        lambda x: x / jnp.asarray(weights, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)), acc
    )
    overall = jax.tree.map(lambda x: jnp.sum(x, axis=0) / total, acc)
    return GroupGradients(names, grads, weights, overall, total)


def mean_gradient(
    problem: CurvatureProblem, params: Params, batches: Iterable[Batch], what: str = "data"
) -> tuple[dict, float]:
    """Token-weighted mean gradient over all response tokens of `batches` (one group)."""
    batches = ({**b, "_all": jnp.zeros_like(b["weights"], jnp.int32)} for b in batches)
    out = group_mean_gradients(problem, params, batches, ("all",), group_key="_all", what=what)
    return out.overall, out.overall_weight


def sigma_subsample(
    example_domains: Sequence[int], sigma: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Sorted indices of a random σ fraction (≥ 1) of each domain's examples (METHOD §1.2)."""
    if not 0 < sigma <= 1:
        raise InputError(f"sigma must be in (0, 1], got {sigma}", field="curvature.sigma")
    domains_n = np.asarray(example_domains)
    rng = np.random.default_rng(seed)
    keep = []
    for d in np.unique(domains_n):
        idx = np.flatnonzero(domains_n == d)
        k = max(1, int(round(sigma * len(idx))))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)


def budget_subsample(
    example_domains: Sequence[int], per_domain: int, seed: int = 0
) -> tuple[np.ndarray, list]:
    """(sorted indices, domains used whole): `per_domain` random entries of each domain.

    Drawn without replacement from the entries (an example the mixture holds twice is two entries),
    so the cost of the passes is flat in the data size. A domain with at most `per_domain` entries
    is used whole and reported in the second value.
    """
    if int(per_domain) != per_domain or per_domain < 1:
        raise InputError(
            f"examples_per_domain must be a positive integer (0 = use sigma), got {per_domain}",
            field="curvature.examples_per_domain",
        )
    domains_n = np.asarray(example_domains)
    rng = np.random.default_rng(seed)
    keep, whole = [], []
    for d in np.unique(domains_n):
        idx = np.flatnonzero(domains_n == d)
        if len(idx) <= per_domain:
            keep.append(idx)
            whole.append(d)
        else:
            keep.append(rng.choice(idx, size=int(per_domain), replace=False))
    return (np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64)), whole


def domain_orders(example_domains: Sequence, seed: int = 0) -> dict:
    """{domain: the indices of its entries in a random order (seeded)}: the α-error budget's draw
    order — its stages take prefixes, so a larger budget extends a smaller one's sample."""
    domains_n = np.asarray(example_domains)
    rng = np.random.default_rng(seed)
    return {d: rng.permutation(np.flatnonzero(domains_n == d)) for d in np.unique(domains_n)}
