"""Influence of training examples on query examples for one model, as a tool of its own.

    from ideal_jax.influence.analyzer import Analyzer
    analyzer = Analyzer("path/to/hf_dir_or.gguf", "train.jsonl", operator="ekfac")
    result = analyzer.score("query.jsonl")      # factors are fitted once, then reused
    result.scores                                # [N train, Q query], see "Units" below
    result.alpha.row("all")                      # per-domain α (Lemma 1, paper scaling)
    result.write("out/")                         # scores.jsonl, scores.npy, alpha.json, ...

The command line is `python -m ideal_jax.analyze` (ideal_jax/analyze.py).

Data: JSONL / JSON / Parquet records in any form ideal_jax reads (data/records.py): chat
`messages`, ShareGPT `conversations`, Alpaca `instruction`/`output`, `prompt`/`response`. A
training record's domain is its `domain` field (all records or none; none: one domain "all"); a
query record's `capability` field groups queries into α rows the same way. Loss and gradients are
taken on response tokens only (data/formatting.py).

What is reused: batches are `batching.fill_rows` rows planned as in the influence stage
(`stage.row_plan`: one example per row, in order of length, loss at response positions only);
curvature from `kfac.accumulate_factors` / `ekfac.fit_eigen_correction`, inverse products from
`operators.build_operator`; gradients and per-example terms from `gradients`
(`single_group_gradients_and_contributions`: one forward + one backward pass per batch gives the
domain gradients and every example's −v · Σ_t w_t ∇ℓ_t); α from `alpha.compute_alpha`.

Units (docs/influence_conventions.md has them next to Kronfluence's, with the conversion):
  H         curvature of the token-weighted MEAN training loss L = Σ_t w_t ℓ_t / W over the whole
            training set (W = its response tokens), damped per layer block by λ_b
  λ_b       `damping` × the block's mean eigenvalue (relative, default) or `damping` itself
            (absolute, in the units of H above)
  scores    S[n, q] = −∇ℓ̄_n · (H + λ)⁻¹ ∇L̄_q, ℓ̄_n and L̄_q the MEAN losses of training example n and
            query q over their response tokens: the first-order change of query q's mean loss
            when example n's weight in the training loss grows. NEGATIVE = helpful (upweighting
            n lowers q's loss), positive = harmful.
  α[r, j]   (paper scaling) = Σ_{n∈j} w_n S̃[n, r] / Σ_{n∈j} w_n, S̃ the scores against α row r's
            reference gradient, w_n example n's response tokens; for row r = a capability c,
            α[c, j] = Σ_{q∈c} Σ_{n∈j} w_q w_n S[n, q] / (W_c W_j) (H⁻¹ is linear), and row "all"
            is the mean over capabilities (reference_weighting "capability") or the token-
            weighted mean over all queries ("token").
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.curvature import ekfac, operators
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.data import batching
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.influence import gradients
from ideal_jax.influence.analysis_io import (
    ExampleSet,
    InfluenceScores,
    Settings,
    load_examples,
)
from ideal_jax.influence.stage import loss_rows_per_example, row_length, row_plan
from ideal_jax.model import hf_io
from ideal_jax.utils import progress
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError


def _model_identity(path: str) -> list:
    """Names, sizes and modification times of the model's files (cheap; no hashing of weights)."""
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))
    )
    out = []
    for f in files:
        st = os.stat(f)
        out.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return out


class Analyzer:
    """Per-example influence train × query and per-domain α for one model and one training set.

    The curvature (factors and EK-FAC correction) is fitted once per Analyzer on the training set
    and reused by every `score` call; with `factors_dir` it is also saved there (keyed by the
    model's files, the tokenized training data and the settings the factors depend on) and
    reloaded by a later Analyzer with the same key.
    """

    def __init__(
        self,
        model: str,
        train: str,
        *,
        tokenizer: str | None = None,
        factors_dir: str | None = None,
        log: Callable[[str], None] | None = None,
        **settings: Any,
    ):
        model = os.fspath(model)
        if not os.path.exists(model):
            raise InputError("no such model directory or .gguf file", path=model, field="model")
        self.model_path = model
        self.settings = Settings(**settings)
        self.factors_dir = factors_dir
        self.log = log  # called with one line at the start and the end of every stage
        self.timings: dict[str, float] = {}
        with self._timed("load model"):
            self.tokenizer = hf_io.load_tokenizer(tokenizer or model)
            self.model_cfg = hf_io.load_hf_config(model)
            self.params = hf_io.load_hf_params(model, self.model_cfg)
        s = self.settings
        with self._timed("load training data"):
            self.train = load_examples(
                train,
                self.tokenizer,
                group_field="domain",
                max_len=s.max_len,
                truncate=s.truncate,
                what="training",
            )
        self.layers = layers_lib.select_layers(self.params, s.layer_patterns())
        self.problem = problem_lib.lm_problem(self.model_cfg, tuple(self.layers))
        self._operator: operators.InverseOperator | None = None
        self.factors_file: str | None = None
        self.curvature_state: kfac_lib.CurvatureState | None = None  # kfac / ekfac, once fitted

    # -- batches ---
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    def _grouped_batches(self, examples: ExampleSet, batch_size: int):
        """[(group index, batch, example indices)]: each batch one group's examples, one per row
        in order of length (stage.row_plan), the loss at the response positions only."""
        k = loss_rows_per_example(list(examples.tokenized))
        ids_of = {name: g for g, name in enumerate(examples.group_names)}
        out = []
        for g, name in enumerate(examples.group_names):
            members = [n for n in range(len(examples)) if examples.groups[n] == name]
            position = {id(examples.tokenized[n]): n for n in members}
            items = [examples.tokenized[n] for n in members]
            for chunk, length, k_rows in row_plan(items, batch_size, self.settings.max_len, k):
                batch = batching.fill_rows(
                    chunk,
                    [np.asarray([i]) for i in range(len(chunk))],
                    length,
                    ids_of,
                    n_rows=batch_size,
                    pad_id=self._pad_id(),
                )
                batch = problem_lib.add_loss_positions(batch, k_rows)
                out.append((g, batch, [position[id(t)] for t in chunk]))
        return out

    # -- curvature ---
    def _factor_cache_path(self) -> tuple[str, dict] | None:
        if not self.factors_dir:
            return None
        key = {
            "model": _model_identity(self.model_path),
            "train": self.train.fingerprint(),
            **self.settings.factor_key(),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(self.factors_dir, f"factors-{digest}.npz"), key

    def operator(self) -> operators.InverseOperator:
        """The inverse-curvature operator, fitted (or loaded) on first use and kept."""
        if self._operator is not None:
            return self._operator
        s = self.settings
        rng = jax.random.key(s.seed)
        train_batches = [b for _, b, _ in self._grouped_batches(self.train, s.batch_size)]
        curvature = state = None
        if s.operator in ("kfac", "ekfac"):
            curvature = kfac_lib.curvature_for(self.problem, s.estimator)
            cache = self._factor_cache_path()
            if cache is not None and os.path.exists(cache[0]):
                with self._timed("load factors"):
                    template = curvature.init(self.params, train_batches[0], rng)
                    state = ekfac.load_state(cache[0], template)
                    self.factors_file = cache[0]
            else:
                with self._timed("fit factors"):
                    state = kfac_lib.accumulate_factors(curvature, self.params, train_batches, rng)
                if s.operator == "ekfac":
                    with self._timed("fit eigenvalue correction"):
                        unit = "example" if s.correction == "per_example" else "batch"
                        state = ekfac.fit_eigen_correction(
                            curvature,
                            state,
                            self.params,
                            train_batches,
                            jax.random.fold_in(rng, 1),
                            unit=unit,
                        )
                if cache is not None:
                    os.makedirs(self.factors_dir, exist_ok=True)
                    ekfac.save_state(cache[0], state)
                    write_json_atomic(cache[0][: -len(".npz")] + ".json", cache[1])
                    self.factors_file = cache[0]
        self.curvature_state = state
        with self._timed("build operator"):
            self._operator = operators.build_operator(
                s.operator,
                problem=self.problem,
                params=self.params,
                damping=s.damping,
                relative_damping=s.relative_damping,
                curvature=curvature,
                state=state,
                batches=train_batches,
                exact_kind=s.exact_kind,
                rng=jax.random.fold_in(rng, 2),
            )
        return self._operator

    # -- scores ---
    def load_query(self, query: str | ExampleSet) -> ExampleSet:
        if isinstance(query, ExampleSet):
            return query
        with self._timed("load query data"):
            return load_examples(
                query,
                self.tokenizer,
                group_field="capability",
                max_len=self.settings.max_len,
                truncate=self.settings.truncate,
                what="query",
            )

    def query_gradients(self, query: ExampleSet) -> gradients.GroupGradients:
        """∇L̄_q of every query (its mean loss over its response tokens), one row per query; one
        query per batch row, every row as long as the longest query (one compilation)."""
        k = loss_rows_per_example(list(query.tokenized))
        length = row_length(max(len(t.input_ids) for t in query.tokenized), self.settings.max_len)
        ids_of = {name: g for g, name in enumerate(query.group_names)}

        def one_per_batch():
            for q, t in enumerate(query.tokenized):
                b = batching.fill_rows(
                    [t], [np.asarray([0])], length, ids_of, pad_id=self._pad_id()
                )
                yield q, problem_lib.add_loss_positions(b, k)

        return gradients.single_group_mean_gradients(
            self.problem, self.params, one_per_batch(), query.ids, what="queries"
        )

    def score(self, query: str | ExampleSet) -> InfluenceScores:
        """Scores [N, Q] of `query` against the training set, and α (rows "all" + capabilities)."""
        s = self.settings
        query = self.load_query(query)
        operator = self.operator()
        with self._timed("query gradients"):
            per_query = self.query_gradients(query)
            by_capability = _grouped_means(per_query, query.groups, query.group_names)
        ref_rows = alpha_lib.reference_rows(by_capability, s.reference_weighting)
        with self._timed("inverse products"):
            vectors = operator.many(
                [per_query.row(q) for q in range(len(query))] + [g for _, g in ref_rows]
            )
        with self._timed("training gradients and scores"):
            plan = self._grouped_batches(self.train, s.batch_size)
            domain_grads, terms = gradients.single_group_gradients_and_contributions(
                self.problem,
                self.params,
                ((g, b) for g, b, _ in plan),
                self.train.group_names,
                vectors,
                what="training examples",
            )
        order = np.concatenate([np.asarray(idx, np.int64) for _, _, idx in plan])
        if terms.c.shape[0] != len(order):  # every example has a response token (load_examples)
            raise AssertionError(f"{terms.c.shape[0]} example terms for {len(order)} examples")
        n_query = len(query)
        c_nr, w_n = np.empty_like(terms.c), np.empty_like(terms.w)
        c_nr[order], w_n[order] = terms.c, terms.w
        scores = c_nr[:, :n_query] / w_n[:, None]  # S = c / w: the example's mean-loss gradient
        alpha = alpha_lib.compute_alpha(
            by_capability,
            domain_grads,
            operator,
            layers=self.layers,
            scaling=s.scaling,
            reference_weighting=s.reference_weighting,
            inverse_vectors=vectors[n_query:],
        )
        group_n = np.asarray([self.train.group_names.index(g) for g in self.train.groups])
        stderr = alpha_lib.standard_errors(
            c_nr[:, n_query:],
            w_n,
            group_n,
            len(self.train.group_names),
            scaling=s.scaling,
            domain_sizes=alpha.domain_sizes,
        )
        result = InfluenceScores(
            scores=scores,
            train=self.train,
            query=query,
            alpha=alpha,
            stderr=stderr,
            train_weights=w_n,
            query_weights=np.asarray(per_query.weights, np.float64),
            settings=s,
            damping={p: float(v) for p, v in operator.damping.items()},
            timings=dict(self.timings),
            factors_file=self.factors_file,
            model_path=self.model_path,
        )
        return result

    def _timed(self, name: str):
        return _Timer(self.timings, name, self.log)


def _grouped_means(
    per_row: gradients.GroupGradients, groups: Sequence[str], names: Sequence[str]
) -> gradients.GroupGradients:
    """Token-weighted mean gradient of each group of rows: Σ_{q∈c} w_q ∇L̄_q / Σ_{q∈c} w_q."""
    w_q = np.asarray(per_row.weights, np.float64)
    member_cq = np.asarray([[g == c for g in groups] for c in names], np.float64)
    mix_cq = member_cq * w_q[None] / (member_cq @ w_q)[:, None]
    mix = jnp.asarray(mix_cq, jnp.float32)
    grads = jax.tree.map(lambda x: jnp.tensordot(mix, x, axes=1), per_row.grads)
    return gradients.GroupGradients(
        tuple(names), grads, member_cq @ w_q, per_row.overall, per_row.overall_weight
    )


class _Timer:
    """`with`: a progress stage (log lines) whose duration is added to timings[name]."""

    def __init__(self, timings: dict, name: str, log: Callable[[str], None] | None = None):
        self.timings, self.name, self.log = timings, name, log

    def __enter__(self):
        self._stage = progress.stage(self.name)
        self._stage.__enter__()
        if self.log:
            self.log(f"{self.name} ...")
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.t0
        self.timings[self.name] = self.timings.get(self.name, 0.0) + seconds
        if self.log:
            self.log(f"{self.name}: {'done' if exc[0] is None else 'failed'} in {seconds:.2f} s")
        return self._stage.__exit__(*exc)


# -- Kronfluence's conventions (docs/influence_conventions.md) ------------------------------------
