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
prompt and padding rows were most of the factor pass. When the
curvature factors of all selected layers would not fit one device (ideal_jax/memory_plan.py), the
layers are processed in groups, one after the other: H is block-diagonal over layers, so α is the
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
from ideal_jax.utils import progress


def mixture_entries(suite, mix) -> list:
    """The round's mixture as tokenized entries, repeats included (what the subsamples draw)."""
    entries = mixture_lib.materialize(mix, suite.tokenized)
    return entries


def subsample(suite, mix, curv_cfg, seed: int) -> tuple[list, dict]:
    """The training subsample for the round's curvature and gradient passes, and what it is.

    `curv_cfg.examples_per_domain` > 0: that many entries of each domain of the mixture (with
    multiplicity; a smaller domain is used whole and named in the returned description); 0: σ.
    """
    per_domain = int(curv_cfg.get("examples_per_domain", 0) or 0)
    if per_domain == 0:
        return sigma_subsample(suite, mix, curv_cfg.sigma, seed), {"sigma": float(curv_cfg.sigma)}
    entries = mixture_entries(suite, mix)
    keep, whole = gradients.budget_subsample([t.domain for t in entries], per_domain, seed)
    if whole:
        logging.warning(
            "curvature.examples_per_domain=%d is at least the size of domain(s) %s in the mixture: "
            "using them whole",
            per_domain,
            sorted(whole),
        )
    return [entries[i] for i in keep], {
        "examples_per_domain": per_domain,
        "domains_used_whole": sorted(str(w) for w in whole),
    }


def sigma_subsample(suite, mix, sigma: float, seed: int) -> list:
    """A random σ fraction (≥ 1) of each domain's entries in the round's mixture, with repeats.

    Entries are drawn without replacement from the mixture *with its multiplicities*, so each
    domain's share of the subsample is its share of the mixture, and within a domain an example
    appears in proportion to its count in the mixture.
    """
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
    if curv_cfg.get("device_memory_gib"):
        return int(curv_cfg.device_memory_gib * 2**30)
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def layer_groups(
    curv_cfg, operator: str, model_cfg, layers: tuple[str, ...], mesh
) -> list[tuple[str, ...]]:
    memory = device_memory_bytes(curv_cfg)
    if memory is None:
        return [layers]
    from ideal_jax.memory_plan import plan_curvature_layer_groups

    groups = plan_curvature_layer_groups(
        model_cfg, list(layers), mesh, memory, ekfac=operator == "ekfac"
    )
    return [tuple(g) for g in groups]


def prefix_start(curv, model_cfg, layers, train_items, ref_items, seq_len: int) -> int:
    """The decoder layer the passes start from (0: the whole model): the lowest curvature layer,
    when the hidden states entering it for every subsample and reference example (rows padded to
    at most `seq_len`) fit curv.prefix_cache_gib."""
    start = problem_lib.first_decoder_layer(tuple(layers))
    rows = len(train_items) * 2 + len(ref_items)  # train batches twice (plain and by domain)
    size = rows * seq_len * model_cfg.hidden_size * 4
    if not start or size > curv.get("prefix_cache_gib", 0.0) * 2**30:
        return 0
    return start


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
) -> RoundInfluence:
    """The round's influence (cfg.curvature, cfg.influence) on the trained `params` over `mix`.

    with_outer=True also builds the round's outer objective problem (ideal_jax/influence/outer.py:
    θ*, u_j = H⁻¹ ∇L̄_j over all layer groups, p, L_ref); keep_group_state keeps each layer
    group's operator and gradients in the result (memory: one copy of the selected layers each).
    """
    pad_id = suite.tokenizer.pad_token_id or 0
    layers = layers_lib.select_layers(params, curv.layers)
    train_items, subsample_info = subsample(suite, mix, curv, seed)
    rng = jax.random.key(seed)
    # Pad mode, one example per row (EK-FAC's "per example" is a row), never truncated. Examples
    # are batched in order of length and each batch is as long as its longest example (bucketed),
    # with the loss taken at the response positions only (row_plan).
    longest = max(len(t.input_ids) for t in train_items + suite.reference_tokenized)
    seq_len = row_length(longest, train_seq_len)

    def batches(items, names, batch_size, *, by_length=True, k=None):
        plans = (
            row_plan(items, batch_size, train_seq_len, k)
            if by_length
            else [(list(items), seq_len, None)]
        )
        for chunk, length, k in plans:
            for b in batching.iterate_batches(
                chunk,
                batch_size,
                length,
                "pad",
                seed,
                0,
                jax.process_index(),
                jax.process_count(),
                domain_names=names,
                pad_id=pad_id,
            ):
                b = b if k is None else problem_lib.add_loss_positions(b, k)
                yield sharding.shard_batch(b, mesh)

    def grouped(items, names, batch_size):
        """(group index, batch) with every batch drawn from one group only (one K for all)."""
        k = loss_rows_per_example(items)
        for g, name in enumerate(names):
            for b in batches([t for t in items if t.domain == name], names, batch_size, k=k):
                yield g, b

    timings = {"factors": 0.0, "eigen_correction": 0.0, "gradients": 0.0, "inverse_products": 0.0}
    train_batches = lambda: batches(train_items, suite.domain_names, curv.batch_size)
    grouped_train = lambda: grouped(train_items, suite.domain_names, curv.batch_size)
    grouped_ref = lambda: grouped(suite.reference_tokenized, suite.capabilities, infl.batch_size)
    groups = layer_groups(curv, infl.operator, model_cfg, layers, mesh)
    memory = device_memory_bytes(curv)
    if memory is not None:  # a batch that does not fit: an error now, not an OOM mid-pass
        from ideal_jax.curvature_batch import check_curvature_batch

        check_curvature_batch(
            model_cfg,
            list(layers),
            mesh,
            memory,
            seq_len,
            curv.batch_size,
            ekfac=infl.operator == "ekfac",
            loss_rows=loss_rows_per_example(train_items),
        )
    start = prefix_start(curv, model_cfg, layers, train_items, suite.reference_tokenized, seq_len)
    if start:  # run the layers below the curvature layers once per batch (problem.PREFIX_HIDDEN)
        t0 = time.perf_counter()
        with progress.stage(f"layers 0-{start - 1} (kept for every pass)"):

            def keep(pairs):
                return [
                    (g, problem_lib.with_prefix_hidden(model_cfg, params, b, start, mesh))
                    for g, b in pairs
                ]

            kept_train = keep(enumerate(train_batches()))
            kept_grouped, kept_ref = keep(grouped_train()), keep(grouped_ref())
            jax.block_until_ready((kept_train, kept_grouped, kept_ref))
        train_batches = lambda: (b for _, b in kept_train)
        grouped_train, grouped_ref = lambda: iter(kept_grouped), lambda: iter(kept_ref)
        timings["prefix_layers"] = time.perf_counter() - t0
    # "exact" scaling needs |D_j| in the unit of the loss: response tokens of domain j in the mix.
    tokens_j = [
        float(_response_tokens(suite.tokenized[name], ids))
        for name, ids in zip(mix.domain_names, mix.example_ids)
    ]
    parts, directions, terms = [], {}, None
    weighting = infl.get("reference_weighting", "capability")
    # The K-FAC / EK-FAC state the operator needs: its own, or the preconditioner of `cg`.
    cg_preconditioner = infl.get("cg_preconditioner", "none")
    fitted = cg_preconditioner if infl.operator.startswith("cg") else infl.operator
    for group in groups:
        problem = problem_lib.lm_problem(model_cfg, group, start)
        t0 = time.perf_counter()
        curvature = state = None
        if fitted in ("kfac", "ekfac"):
            curvature = kfac_lib.curvature_for(
                problem, curv.estimator, kfac_lib.params_mesh(params)
            )
            with progress.stage("factors"):
                state = kfac_lib.accumulate_factors(curvature, params, train_batches(), rng)
            timings["factors"] += time.perf_counter() - t0
            if fitted == "ekfac":
                t0 = time.perf_counter()
                unit = "example" if curv.correction == "per_example" else "batch"
                with progress.stage("eigenvalue correction"):
                    state = ekfac.fit_eigen_correction(
                        curvature,
                        state,
                        params,
                        train_batches(),
                        jax.random.fold_in(rng, 1),
                        unit=unit,
                    )
                timings["eigen_correction"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        operator = operators.build_operator(
            infl.operator,
            problem=problem,
            params=params,
            damping=curv.damping,
            relative_damping=curv.relative_damping,
            curvature=curvature,
            state=state,
            batches=train_batches,
            cg_tol=infl.get("cg_tol", 1e-6),
            cg_max_iters=infl.get("cg_max_iters", 200),
            cg_preconditioner=cg_preconditioner,
            rng=jax.random.fold_in(rng, 2),
        )
        with progress.stage("reference gradients"):
            ref_grads = gradients.single_group_mean_gradients(
                problem,
                params,
                grouped_ref(),
                suite.capabilities,
                what="reference set",
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
        with progress.stage("domain gradients"):
            domain_grads, part = gradients.single_group_gradients_and_contributions(
                problem,
                params,
                grouped_train(),
                suite.domain_names,
                inverse_vectors,
                what="training domains",
            )
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
            sigma=subsample_info.get("sigma"),  # None when a per-domain budget was used
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
        terms.c,
        terms.w,
        terms.group,
        len(suite.domain_names),
        scaling=infl.scaling,
        domain_sizes=tokens_j,
    )
    counts = np.bincount(terms.group, minlength=len(suite.domain_names))
    subsample_info["examples"] = {n: int(c) for n, c in zip(suite.domain_names, counts)}
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
        subsample_examples=len(train_items),
        seq_len=seq_len,
        timings=timings,
    )
    if not with_outer:
        return result
    # One row length, all token rows: the outer objective stacks these batches into one array.
    ref_batches = list(
        batches(suite.reference_tokenized, suite.capabilities, infl.batch_size, by_length=False)
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
    cfg, model_cfg, params, suite, mix, mesh, *, with_outer: bool = False
) -> RoundInfluence:
    """`influence_for_round` with the sections it reads taken from a whole run config
    (cfg.curvature, cfg.influence, cfg.seed, cfg.train.seq_len)."""
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
    )


def _response_tokens(tokenized, ids) -> int:
    counts = {t.example_id: int(np.sum(t.loss_mask)) for t in tokenized}
    return sum(counts.get(i, 0) for i in ids)
