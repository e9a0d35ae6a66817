"""The influence stage of an IDEAL round: curvature → gradients → α (Lemma 1), with timings.

Factors, EK-FAC correction and domain gradients use a subsample of each domain's entries in the
round's mixture — a fixed number per domain (`curvature.examples_per_domain`, so the cost is flat
in the data size) or a σ fraction (when that is 0) — repeats included (an example the mixture
holds twice is twice as likely to be drawn, and may be drawn twice), so they estimate the curvature
and gradients of the loss that was trained; the reference set is used whole (METHOD.md §1.2).

Passes over the subsample per layer group (docs/method_choices.md): K-FAC factors (kfac-jax: one
forward + one backward pass per batch), EK-FAC correction (one forward + one backward pass per
batch, captured layer inputs and output gradients), domain gradients fused with the per-example
terms of α (one forward + one backward). The reference set: one forward + one backward pass.
The per-example terms give α's standard errors (alpha.standard_errors → influence.json "stderr").
Batches (`row_plan`): one example per row, examples in order of length, each batch only as long as
its longest example; the loss (softmax over the vocabulary, the Fisher's sampled targets) at the
response tokens only (curvature/kfac.py add_loss_positions) — on a 49k-token vocabulary the
prompt and padding rows were most of the factor pass. When the curvature factors of all
selected layers would not fit one device (ideal_jax/curvature/memory_plan.py), the layers are
processed in groups, one after the other: H is block-diagonal over layers, so α is the
sum of the groups' contributions.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from absl import logging

from ideal_jax import sharding
from ideal_jax.curvature import ekfac, operators
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.data import batching
from ideal_jax.data import mixture as mixture_lib
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients, outer
from ideal_jax.influence.result import GroupInfluence, RoundInfluence, combine_groups
from ideal_jax.model import decoding
from ideal_jax.train import finetuning
from ideal_jax.train.prefix_cache import PrefixCache
from ideal_jax.utils import progress
from ideal_jax.utils.errors import InputError


def mixture_entries(suite, mix) -> list:
    """The round's mixture as tokenized entries, repeats included (what the subsamples draw)."""
    return mixture_lib.materialize(mix, suite.tokenized)


# -- sub-stage 1: the subsample ----------------------------------------------------------------


SUBSAMPLES = ("alpha_se", "fixed", "sigma")
ALLOCATIONS = ("proportional", "per_domain")  # curvature.allocation


@dataclasses.dataclass(frozen=True)
class SubsamplePlan:
    """Which examples each pass reads (`plan_subsample`).

    curvature_items: the factor and eigen-correction passes' examples (and the exact / CG
      operators'): as many as `examples_per_domain` entries of each domain would be, split over
      the domains in proportion to their entries in the mixture (curvature.allocation), or the σ
      fraction.
    by_domain: per domain (suite.domain_names order), the gradient pass's candidates in draw
      order; a stage takes the next ones. first / cap: how many the first stage takes and the
      most any stage may reach. target: the α-error budget (None: one stage, `first` of each).
    """

    curvature_items: list
    by_domain: tuple[list, ...]
    first: tuple[int, ...]
    cap: tuple[int, ...]
    target: float | None
    info: dict


def subsample_mode(curv) -> str:
    """alpha_se | fixed | sigma; `examples_per_domain = 0` is σ whatever the mode says (configs
    written before the mode existed set it to 0 to ask for σ)."""
    mode = curv.subsample
    if mode not in SUBSAMPLES:
        raise InputError(
            f"{mode!r} is not allowed; allowed: {', '.join(SUBSAMPLES)}",
            field="curvature.subsample",
        )
    return "sigma" if int(curv.examples_per_domain) == 0 else mode


def proportional_counts(sizes: list[int], total: int) -> list[int]:
    """`total` examples split over groups of `sizes` entries in proportion to the sizes (largest
    remainder; ties to the earlier group), each at most its size."""
    sizes_j = np.asarray(sizes, np.int64)
    n = int(sizes_j.sum())
    total = min(int(total), n)
    if n == 0 or total == 0:
        return [0] * len(sizes)
    exact = total * sizes_j / n
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def curvature_counts(curv, by_domain, per_domain: int) -> list[int]:
    """How many of each domain's entries (in draw order) the curvature passes read.

    proportional  the total that `per_domain` of each domain would give, split in proportion to
                  the domains' entries in the mixture: the sample's factors and Λ* estimate the
                  Hessian of the training mixture itself. (An equal number per domain estimates
                  the Hessian of an equal-domain mix: measured, it biased α — with every domain
                  gradient, the step's cosine to the whole data's was 0.83 against 0.93;
                  docs/results/alpha_budget_s11.md.)
    per_domain    `per_domain` entries of each domain (the sample before session 11).
    """
    allocation = curv.allocation
    if allocation not in ALLOCATIONS:
        raise InputError(
            f"{allocation!r} is not allowed; allowed: {', '.join(ALLOCATIONS)}",
            field="curvature.allocation",
        )
    equal = [min(per_domain, len(b)) for b in by_domain]
    if allocation == "per_domain":
        return equal
    return proportional_counts([len(b) for b in by_domain], sum(equal))


def plan_subsample(suite, mix, curv, seed: int) -> SubsamplePlan:
    """The round's subsample plan (cfg.curvature):

    sigma     a random σ fraction of each domain's mixture entries, for every pass;
    fixed     `examples_per_domain` entries of each domain for the domain gradients (cost flat
              in |D|); the curvature passes read as many entries, allocated by
              `curvature_counts`;
    alpha_se  the curvature passes as for fixed; the domain gradients start from
              `examples_per_domain` entries of each domain and double, per domain, while the
              domain's α standard error (row "all") exceeds `alpha_se_target` × the RMS of that
              row over the domains, up to `max_examples_per_domain` (influence_for_round's
              `grow_domain_terms`).

    Entries are drawn without replacement from the mixture *with its multiplicities*: an example
    the mixture holds twice is twice as likely to be drawn, and may be drawn twice.
    """
    mode = subsample_mode(curv)
    entries = mixture_entries(suite, mix)
    names = list(mix.domain_names)
    domain_of = [t.domain for t in entries]
    if mode == "sigma":
        keep = gradients.sigma_subsample(domain_of, curv.sigma, seed)
        return _one_stage([entries[i] for i in keep], names, {"sigma": float(curv.sigma)})
    per_domain = int(curv.examples_per_domain)
    order = gradients.domain_orders(domain_of, seed)  # {domain: its entries' indices, shuffled}
    by_domain = tuple([entries[i] for i in order.get(n, [])] for n in names)
    counts = curvature_counts(curv, by_domain, per_domain)
    curvature_items = [t for b, k in zip(by_domain, counts) for t in b[:k]]
    allocation = {
        "allocation": curv.allocation,
        "curvature_examples": {n: k for n, k in zip(names, counts)},
    }
    if mode == "fixed":
        keep, whole = gradients.budget_subsample(domain_of, per_domain, seed)
        _warn_whole(per_domain, whole)
        info = {"examples_per_domain": per_domain, "domains_used_whole": sorted(map(str, whole))}
        plan = _one_stage([entries[i] for i in keep], names, info | allocation)
        if curv.allocation == "per_domain":  # every pass on the same entries, as before
            return plan
        return dataclasses.replace(plan, curvature_items=curvature_items)
    cap = int(curv.max_examples_per_domain)
    if cap < per_domain:
        raise InputError(
            f"must be >= curvature.examples_per_domain ({per_domain}), got {cap}",
            field="curvature.max_examples_per_domain",
        )
    first = tuple(min(per_domain, len(b)) for b in by_domain)
    caps = tuple(min(cap, len(b)) for b in by_domain)
    info = {
        "budget": "alpha_se",
        "curvature_examples_per_domain": per_domain,
        "max_examples_per_domain": cap,
        "alpha_se_target": float(curv.alpha_se_target),
    } | allocation
    return SubsamplePlan(curvature_items, by_domain, first, caps, float(curv.alpha_se_target), info)


def _one_stage(items: list, names: list, info: dict) -> SubsamplePlan:
    """sigma / fixed: every pass reads `items`; the domain gradients in one stage."""
    by_domain = tuple([t for t in items if t.domain == n] for n in names)
    sizes = tuple(len(b) for b in by_domain)
    return SubsamplePlan(items, by_domain, sizes, sizes, None, info)


def _warn_whole(per_domain: int, whole) -> None:
    if whole:
        logging.warning(
            "curvature.examples_per_domain=%d is at least the size of domain(s) %s in the mixture: "
            "using them whole",
            per_domain,
            sorted(whole),
        )


def subsample(suite, mix, curv_cfg, seed: int) -> tuple[list, dict]:
    """(the curvature passes' examples, what they are): `plan_subsample`'s curvature items. For
    sigma and fixed they are also every example the domain gradients read."""
    plan = plan_subsample(suite, mix, curv_cfg, seed)
    return plan.curvature_items, plan.info


def sigma_subsample(suite, mix, sigma: float, seed: int) -> list:
    """A random σ fraction (≥ 1) of each domain's entries in the round's mixture, with repeats
    (drawn without replacement from the entries, so each domain's share of the subsample is its
    share of the mixture)."""
    entries = mixture_entries(suite, mix)
    keep = gradients.sigma_subsample([t.domain for t in entries], sigma, seed)
    return [entries[i] for i in keep]


def row_length(longest: int, train_seq_len: int) -> int:
    """Row length for examples of at most `longest` tokens: the power-of-two bucket, capped at the
    training length, or `longest` itself when it exceeds that (never truncated)."""
    return longest if longest > train_seq_len else min(train_seq_len, decoding.bucket(longest))


def loss_rows_per_example(items: list) -> int:
    """K: the most response tokens of one example, rounded up to a power of two (at least 8)."""
    return decoding.bucket(max((int(np.sum(t.loss_mask)) for t in items), default=1))


def row_plan(
    items: list, batch_size: int, train_seq_len: int, k: int | None = None
) -> list[tuple[list, int, int]]:
    """[(examples, row length, loss rows K)] per global batch: the examples in order of length (a
    stable sort, so every host plans the same batches), each batch padded only to its own longest
    example (`row_length`), and the loss formed at K positions per row (problem.add_loss_positions):
    `k`, else `loss_rows_per_example(items)`: one K for the pass, so that a pass compiles at most
    one program per row length. Prompt and padding tokens carry no loss weight: the vocabulary-
    sized softmax and the Fisher's sampled targets are computed for response tokens only.
    """
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    k = loss_rows_per_example(items) if k is None else k
    plans = []
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        longest = max(len(t.input_ids) for t in chunk)
        plans.append((chunk, row_length(longest, train_seq_len), k))
    return plans


def device_memory_bytes(curv_cfg) -> int | None:
    """Memory of one accelerator (config override, else what the runtime reports; CPU: None)."""
    if curv_cfg.device_memory_gib:
        return int(curv_cfg.device_memory_gib * 2**30)
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def layer_groups(
    curv_cfg, operator: str, model_cfg, layers: tuple[str, ...], mesh
) -> list[tuple[str, ...]]:
    memory = device_memory_bytes(curv_cfg)
    if memory is None:
        return [layers]
    from ideal_jax.curvature.memory_plan import plan_curvature_layer_groups

    groups = plan_curvature_layer_groups(
        model_cfg, list(layers), mesh, memory, ekfac=operator == "ekfac"
    )
    return [tuple(g) for g in groups]


def prefix_start(curv, model_cfg, layers, kept_items: int, seq_len: int) -> int:
    """The decoder layer the passes start from (0: the whole model): the lowest curvature layer,
    when the hidden states entering it for the `kept_items` examples read more than once (the
    curvature passes' and the reference set's; rows padded to at most `seq_len`) fit
    curv.prefix_cache_gib. The domain-gradient batches compute theirs as they go."""
    start = problem_lib.first_decoder_layer(tuple(layers))
    size = kept_items * seq_len * model_cfg.hidden_size * 4
    if not start or size > curv.prefix_cache_gib * 2**30:
        return 0
    return start


class _Batches:
    """The round's batches: one example per row, never truncated, examples in order of length and
    each batch as long as its longest example (bucketed), the loss at response positions only
    (row_plan); sharded over the mesh; with the hidden state entering layer `start` attached when
    the passes start above layer 0 (problem.PREFIX_HIDDEN)."""

    def __init__(self, suite, model_cfg, params, mesh, seed, train_seq_len, seq_len):
        self.suite, self.model_cfg, self.params, self.mesh = suite, model_cfg, params, mesh
        self.seed, self.train_seq_len, self.seq_len = seed, train_seq_len, seq_len
        self.pad_id = suite.tokenizer.pad_token_id or 0
        self.start = 0
        self.cache = None  # PrefixCache: the hidden states entering `start`, per example

    def plain(self, items, names, batch_size, *, by_length=True, k=None, prefix=True):
        read_cache = bool(prefix and self.start and self.cache is not None)
        plans = (
            row_plan(items, batch_size, self.train_seq_len, k)
            if by_length
            else [(list(items), self.seq_len, None)]
        )
        for chunk, length, k in plans:
            for b in batching.iterate_batches(
                chunk,
                batch_size,
                length,
                "pad",
                self.seed,
                0,
                jax.process_index(),
                jax.process_count(),
                domain_names=names,
                pad_id=self.pad_id,
            ):
                b = b if k is None else problem_lib.add_loss_positions(b, k)
                if read_cache:  # the training's entries, read on the host, not recomputed
                    b[problem_lib.PREFIX_HIDDEN] = self.cache.hidden(b)
                b = sharding.shard_batch(b, self.mesh)
                yield self.prefixed(b) if prefix and not read_cache else b

    def grouped(self, items_by_group, names, batch_size, k):
        """(group index, batch), every batch drawn from one group only (one K for all)."""
        for g, items in enumerate(items_by_group):
            for b in self.plain(items, names, batch_size, k=k):
                yield g, b

    def prefixed(self, b):
        if not self.start:
            return b
        return problem_lib.with_prefix_hidden(self.model_cfg, self.params, b, self.start, self.mesh)


# -- sub-stage 2: factors ------------------------------------------------------------------------


def fit_curvature(curv, fitted: str, problem, params, batches, rng, timings: dict):
    """(kfac-jax curvature, its state with the EK-FAC correction when `fitted` is ekfac) over the
    curvature batches, or (None, None) when the operator needs no factors."""
    if fitted not in ("kfac", "ekfac"):
        return None, None
    t0 = time.perf_counter()
    curvature = kfac_lib.curvature_for(problem, curv.estimator, kfac_lib.params_mesh(params))
    # EK-FAC: the factor pass keeps its captures (up to keep_captures_gib) for the correction
    keep = int(curv.keep_captures_gib * 2**30) if fitted == "ekfac" else 0
    with progress.stage("factors"):
        state, kept = kfac_lib.accumulate_factors_keeping(curvature, params, batches(), rng, keep)
    timings["factors"] += time.perf_counter() - t0
    if fitted == "ekfac":
        t0 = time.perf_counter()
        unit = "example" if curv.correction == "per_example" else "batch"
        with progress.stage("eigenvalue correction"):
            if kept is not None:  # no second model pass
                state = ekfac.correction_from_captures(curvature, state, kept, unit=unit)
            else:
                state = ekfac.fit_eigen_correction(
                    curvature, state, params, batches(), jax.random.fold_in(rng, 1), unit=unit
                )
        del kept
        timings["eigen_correction"] += time.perf_counter() - t0
    return curvature, state


# -- sub-stage 4: gradients (the operator, sub-stage 3, is operators.build_operator) -----------


@dataclasses.dataclass(frozen=True)
class GradientStages:
    """How many examples of each domain the domain-gradient pass read, stage by stage, and why it
    stopped (the α-error budget; one stage otherwise). `ranges[s][j]` = (start, end) of domain j's
    examples in stage s: later layer groups replay the same batches, so that the per-example terms
    of all groups line up."""

    ranges: tuple[tuple[tuple[int, int], ...], ...]
    log: tuple[dict, ...]
    stopped: str

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(end for _, end in self.ranges[-1]) if self.ranges else ()


def grow_domain_terms(plan: SubsamplePlan, add_stage, names, scaling, tokens_j) -> GradientStages:
    """Runs the domain-gradient stages: `add_stage(ranges)` streams domain j's examples
    plan.by_domain[j][start:end] into the accumulator and returns the per-example terms so far.

    With a target (the α-error budget), after each stage: α's row "all" and its standard errors
    from the terms; domain j is resolved when s.e._j ≤ target × RMS_k(α_k); every unresolved
    domain below its cap doubles its examples; stop when none is left to grow.
    """
    sizes = [0] * len(names)
    want = list(plan.first)
    ranges, log = [], []
    while True:
        stage = tuple((have, end) for have, end in zip(sizes, want))
        terms = add_stage(stage)
        ranges.append(stage)
        sizes = list(want)
        if plan.target is None:
            return GradientStages(tuple(ranges), tuple(log), "one stage")
        args = (terms.c[:, :1], terms.w, terms.group, len(names))
        kw = dict(scaling=scaling, domain_sizes=tokens_j)
        a_j = alpha_lib.alpha_from_terms(*args, **kw)[0]
        se_j = alpha_lib.standard_errors(*args, **kw)[0]
        scale = float(np.sqrt(np.nanmean(a_j**2))) if np.any(np.isfinite(a_j)) else 0.0
        resolved = np.isfinite(se_j) & (se_j <= plan.target * scale)
        unresolved = [j for j in range(len(names)) if not resolved[j]]
        grow = [j for j in unresolved if sizes[j] < plan.cap[j]]
        log.append(
            {
                "examples": dict(zip(names, sizes)),
                "se_over_rms_alpha": {
                    n: (float(se_j[j] / scale) if scale > 0 and np.isfinite(se_j[j]) else None)
                    for j, n in enumerate(names)
                },
            }
        )
        if not grow:  # resolved, or every unresolved domain at its cap / used whole
            capped = any(plan.cap[j] < len(plan.by_domain[j]) for j in unresolved)
            stopped = "resolved" if not unresolved else "cap" if capped else "whole"
            return GradientStages(tuple(ranges), tuple(log), stopped)
        want = [min(2 * n, plan.cap[j]) if j in grow else n for j, n in enumerate(sizes)]


# -- the stage -----------------------------------------------------------------------------------


def influence_for_round(
    curv,
    infl,
    model_cfg,
    params,
    suite,
    mix,
    mesh,
    *,
    seed: int,
    train_seq_len: int,
    with_outer: bool = False,
    keep_group_state: bool = False,
    prefix_cache: tuple[str, int] | None = None,
) -> RoundInfluence:
    """The round's influence (cfg.curvature, cfg.influence) on the trained `params` over `mix`:
    subsample (plan_subsample) → factors (fit_curvature) → operator (operators.build_operator) →
    gradients (reference, then domains with grow_domain_terms) → α (alpha.compute_alpha) and its
    standard errors, per layer group (H is block-diagonal over layers: the groups add up).

    with_outer=True also builds the round's outer objective problem (ideal_jax/influence/outer.py:
    θ*, u_j = H⁻¹ ∇L̄_j over all layer groups, p, L_ref); keep_group_state keeps each layer
    group's operator and gradients in the result (memory: one copy of the selected layers each).
    prefix_cache = (directory, layer): when the passes start at that layer (freeze: the first
    trained one), the hidden states entering it are read from the training's per-example cache
    (train/prefix_cache.py) instead of recomputed, for every pass (domain gradients included).
    """
    layers = layers_lib.select_layers(params, curv.layers)
    plan = plan_subsample(suite, mix, curv, seed)
    names = tuple(suite.domain_names)
    rng = jax.random.key(seed)
    candidates = [t for b, cap in zip(plan.by_domain, plan.cap) for t in b[:cap]]
    everything = plan.curvature_items + candidates + list(suite.reference_tokenized)
    seq_len = row_length(max(len(t.input_ids) for t in everything), train_seq_len)
    io = _Batches(suite, model_cfg, params, mesh, seed, train_seq_len, seq_len)
    k_train = loss_rows_per_example(plan.curvature_items + candidates)
    k_ref = loss_rows_per_example(list(suite.reference_tokenized))
    timings = {"factors": 0.0, "eigen_correction": 0.0, "gradients": 0.0, "inverse_products": 0.0}
    groups = layer_groups(curv, infl.operator, model_cfg, layers, mesh)
    memory = device_memory_bytes(curv)
    if memory is not None:  # a batch that does not fit: an error now, not an OOM mid-pass
        from ideal_jax.curvature.batch_plan import check_curvature_batch

        check_curvature_batch(
            model_cfg,
            list(layers),
            mesh,
            memory,
            seq_len,
            curv.batch_size,
            ekfac=infl.operator == "ekfac",
            loss_rows=k_train,
        )
    by_capability = [
        [t for t in suite.reference_tokenized if t.domain == c] for c in suite.capabilities
    ]
    curvature_batches = lambda: io.plain(plan.curvature_items, names, curv.batch_size)
    reference_batches = lambda: io.grouped(
        by_capability, suite.capabilities, infl.batch_size, k_ref
    )
    kept = len(plan.curvature_items) + len(suite.reference_tokenized)
    io.start = prefix_start(curv, model_cfg, layers, kept, seq_len)
    if prefix_cache is not None and io.start and io.start == prefix_cache[1]:
        io.cache = PrefixCache(
            model_cfg,
            params,
            io.start,
            train_seq_len,
            mesh,
            rows=curv.batch_size,
            memory_bytes=int(curv.prefix_cache_gib * 2**30),
            directory=prefix_cache[0],
        )
    if io.start:  # run the layers below the curvature layers once for what is read repeatedly
        t0 = time.perf_counter()
        with progress.stage(f"layers 0-{io.start - 1} (kept for every pass)"):
            kept_curvature, kept_ref = list(curvature_batches()), list(reference_batches())
            jax.block_until_ready((kept_curvature, kept_ref))
        curvature_batches, reference_batches = lambda: iter(kept_curvature), lambda: iter(kept_ref)
        timings["prefix_layers"] = time.perf_counter() - t0
    # "exact" scaling needs |D_j| in the unit of the loss: response tokens of domain j in the mix.
    tokens_j = [
        float(_response_tokens(suite.tokenized[name], ids))
        for name, ids in zip(mix.domain_names, mix.example_ids)
    ]
    weighting = infl.reference_weighting
    # The K-FAC / EK-FAC state the operator needs: its own, or the preconditioner of `cg`.
    fitted = infl.cg_preconditioner if infl.operator.startswith("cg") else infl.operator
    parts, directions, terms, stages = [], {}, None, None
    for group in groups:
        problem = problem_lib.lm_problem(model_cfg, group, io.start)
        curvature, state = fit_curvature(
            curv, fitted, problem, params, curvature_batches, rng, timings
        )
        t0 = time.perf_counter()
        operator = operators.build_operator(
            infl.operator,
            problem=problem,
            params=params,
            damping=curv.damping,
            relative_damping=curv.relative_damping,
            curvature=curvature,
            state=state,
            batches=curvature_batches,
            cg_tol=infl.cg_tol,
            cg_max_iters=infl.cg_max_iters,
            cg_preconditioner=infl.cg_preconditioner,
            rng=jax.random.fold_in(rng, 2),
        )
        with progress.stage("reference gradients"):
            ref_grads = gradients.single_group_mean_gradients(
                problem, params, reference_batches(), suite.capabilities, what="reference set"
            )
        timings["gradients"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with progress.stage("inverse products"):
            # one inverse product per reference row: v_r = H⁻¹ g_ref,r (H symmetric)
            inverse_vectors = operator.many(
                [g for _, g in alpha_lib.reference_rows(ref_grads, weighting)]
            )
        timings["inverse_products"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = gradients.GradientsAndTerms(problem, params, names, inverse_vectors)

        def add_stage(ranges, acc=acc):
            chosen = [plan.by_domain[j][a:b] for j, (a, b) in enumerate(ranges)]
            with progress.stage("domain gradients"):
                acc.add(io.grouped(chosen, names, curv.batch_size, k_train), "training domains")
            return acc.terms()

        if stages is None:  # the first layer group sets the sizes; the others replay them
            stages = grow_domain_terms(plan, add_stage, names, infl.scaling, tokens_j)
        else:
            for ranges in stages.ranges:
                add_stage(ranges)
        domain_grads, part = acc.finish("training domains"), acc.terms()
        timings["gradients"] += time.perf_counter() - t0
        # H is block-diagonal over layers: the groups' per-example terms add up, example by example
        terms = part if terms is None else dataclasses.replace(terms, c=terms.c + part.c)
        t0 = time.perf_counter()
        part_alpha = alpha_lib.compute_alpha(
            ref_grads,
            domain_grads,
            operator,
            layers=group,
            scaling=infl.scaling,
            domain_sizes=tokens_j,
            sigma=plan.info.get("sigma"),  # None when a per-domain budget was used
            reference_weighting=weighting,
            inverse_vectors=inverse_vectors,
        )
        if with_outer:  # u_j for this group's layers (H is block-diagonal over groups)
            directions.update(outer.directions(operator, domain_grads))
        timings["inverse_products"] += time.perf_counter() - t0
        keep = keep_group_state
        parts.append(
            GroupInfluence(
                alpha=part_alpha,
                operator_info=dict(operator.info) if operator.info else None,
                operator=operator if keep else None,
                domain_gradients=domain_grads if keep else None,
                reference_gradients=ref_grads if keep else None,
            )
        )
    stderr = alpha_lib.standard_errors(
        terms.c, terms.w, terms.group, len(names), scaling=infl.scaling, domain_sizes=tokens_j
    )
    counts = np.bincount(terms.group, minlength=len(names))
    subsample_info = dict(plan.info)
    subsample_info["examples"] = {n: int(c) for n, c in zip(names, counts)}
    if plan.target is not None:
        subsample_info["stages"] = list(stages.log)
        subsample_info["stopped"] = stages.stopped
    # H is block-diagonal over layers: each group adds its layers' share of every dot product.
    alpha = dataclasses.replace(
        combine_groups([g.alpha for g in parts], stderr=stderr), layers=tuple(layers)
    )
    result = RoundInfluence(
        alpha=alpha,
        groups=tuple(parts),
        estimator=curv.estimator,
        relative_damping=bool(curv.relative_damping),
        correction=curv.correction if infl.operator == "ekfac" else None,
        subsample=subsample_info,
        subsample_examples=int(sum(stages.sizes)),
        seq_len=seq_len,
        timings=timings,
    )
    if not with_outer:
        return result
    # One row length, all token rows: the outer objective stacks these batches into one array.
    ref_batches = list(
        io.plain(
            suite.reference_tokenized,
            suite.capabilities,
            infl.batch_size,
            by_length=False,
            prefix=False,  # Q(w) runs the whole model
        )
    )
    problem_all = problem_lib.lm_problem(model_cfg, tuple(layers))
    ref_loss = outer.reference_loss_fn(
        problem_all, params, ref_batches, len(suite.capabilities), weighting
    )
    # p_j: domain j's share of the training loss weight (response tokens), as in the inner problem.
    shares = np.asarray(tokens_j) / np.sum(tokens_j)
    problem = outer.outer_problem(problem_all, params, directions, shares, ref_loss)
    return dataclasses.replace(result, outer_problem=problem)


def influence_from_config(
    cfg,
    model_cfg,
    params,
    suite,
    mix,
    mesh,
    *,
    with_outer: bool = False,
    prefix_cache_dir: str | None = None,
) -> RoundInfluence:
    """`influence_for_round` with the sections it reads taken from a whole run config
    (cfg.curvature, cfg.influence, cfg.seed, cfg.train.seq_len). prefix_cache_dir: the freeze
    training's prefix cache (train/stage.py), read when the passes start at the first trained
    layer."""
    first_trained = 0
    if prefix_cache_dir is not None:
        first_trained = finetuning.from_config(cfg.train, model_cfg.num_layers).first_trained_layer
    return influence_for_round(
        cfg.curvature,
        cfg.influence,
        model_cfg,
        params,
        suite,
        mix,
        mesh,
        seed=cfg.seed,
        train_seq_len=cfg.train.seq_len,
        with_outer=with_outer,
        prefix_cache=(prefix_cache_dir, first_trained) if first_trained else None,
    )


def _response_tokens(tokenized, ids) -> int:
    counts = {t.example_id: t.response_tokens for t in tokenized}
    return sum(counts.get(i, 0) for i in ids)
