"""The Analyzer's inputs and outputs: settings, example sets read from JSONL (or any record form
ideal_jax reads), the scores it returns (and writes: scores.jsonl, scores.npy, alpha.json,
analysis.json), and the unit conversions to Kronfluence's (docs/influence_conventions.md).
The units themselves are stated in ideal_jax/influence/analyzer.py's docstring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.data import formatting, records
from ideal_jax.influence import alpha as alpha_lib
from ideal_jax.utils.atomic import write_json_atomic
from ideal_jax.utils.errors import InputError

SINGLE_GROUP = "all"  # domain / capability of records without a `domain` / `capability` field


@dataclasses.dataclass(frozen=True)
class Settings:
    """How influence is computed; the defaults are those of configs/common.py's curvature and
    influence sections (tests/test_analyzer.py checks that they agree)."""

    layers: str = "mlp"  # preset (mlp | attention | all_linear) or comma-separated regexes
    operator: str = "ekfac"  # identity | kfac | ekfac | exact | exact_block | cg | cg_block
    estimator: str = "fisher"  # fisher (sampled targets) | empirical (the data's targets)
    correction: str = "per_example"  # EK-FAC eigenvalue fit: per_example | per_batch
    damping: float = 0.1
    relative_damping: bool = True  # damping × each block's mean eigenvalue (Kronfluence's rule)
    scaling: str = "paper"  # α: paper | exact (alpha.py)
    reference_weighting: str = "capability"  # α row "all": capability | token
    batch_size: int = 32
    max_len: int = 1024  # tokens per example (longer ones are truncated by `truncate`)
    truncate: str = "left_prompt"
    exact_kind: str = "ggn"  # curvature of the exact / exact_block / cg operators
    seed: int = 0

    def layer_patterns(self) -> str | tuple[str, ...]:
        if self.layers in layers_lib.LAYER_PRESETS:
            return self.layers
        return tuple(p.strip() for p in self.layers.split(",") if p.strip())

    def factor_key(self) -> dict:
        """The settings the curvature factors depend on."""
        return {
            "layers": self.layers,
            "estimator": self.estimator,
            "corrected": self.operator == "ekfac",
            "correction": self.correction,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


@dataclasses.dataclass(frozen=True)
class ExampleSet:
    """Tokenized examples of one file, in file order, with where each came from."""

    path: str
    ids: tuple[str, ...]
    groups: tuple[str, ...]  # domain (training) or capability (query) per example
    locations: tuple[str, ...]  # "line 7" etc.
    tokenized: tuple[formatting.TokenizedExample, ...]  # .domain is the group
    group_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def token_weights(self) -> np.ndarray:
        """w_n: the response tokens of each example that are targets (its loss weight)."""
        return np.asarray(
            [float(np.sum(t.loss_mask[1:])) for t in self.tokenized], np.float64
        )  # a target is the next token: the first token of a sequence is never one

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.tokenized:
            h.update(t.domain.encode() + b"\0")
            h.update(np.asarray(t.input_ids, np.int32).tobytes())
            h.update(np.asarray(t.loss_mask, np.bool_).tobytes())
        return h.hexdigest()


def load_examples(
    path: str,
    tokenizer: Any,
    *,
    group_field: str,
    max_len: int,
    truncate: str,
    what: str,
) -> ExampleSet:
    """Reads, normalizes and tokenizes one data file; every problem is an InputError naming the
    file, the record and the field (missing file, unknown record shape, an empty set, a record
    with a group field when others have none, duplicate ids, no response token left)."""
    path = os.fspath(path)
    raw = records.read_records(path)
    if not raw:
        raise InputError(f"the {what} set is empty (no records)", path=path)
    with_group = [loc for loc, rec in raw if rec.get(group_field) is not None]
    if with_group and len(with_group) != len(raw):
        missing = next(loc for loc, rec in raw if rec.get(group_field) is None)
        raise InputError(
            f"missing {group_field!r} (other records have one: all records or none)",
            path=path,
            record=missing,
            field=group_field,
        )
    examples, seen = [], {}
    for index, (location, record) in enumerate(raw):
        group = record.get(group_field) if with_group else SINGLE_GROUP
        if not isinstance(group, str) or not group:
            raise InputError(
                f"{group_field} must be a non-empty string", path=path, record=location
            )
        ex = records.normalize_record(
            record, domain=group, index=index, path=path, location=location
        )
        records.note_unique_id(seen, ex.id, path, location)
        examples.append((location, ex))
    try:
        kept, _ = formatting.tokenize_examples(
            [ex for _, ex in examples], tokenizer, max_len=max_len, truncate=truncate
        )
    except InputError:  # every example of a group dropped: name the first dropped record below
        kept = []
    by_id = {t.example_id: t for t in kept}
    for location, ex in examples:
        if ex.id not in by_id:
            raise InputError(
                f"no response token left after tokenizing to max_len={max_len} (policy "
                f"{truncate!r}); raise max_len or shorten the prompt",
                path=path,
                record=location,
                field="response",
            )
    names = tuple(dict.fromkeys(ex.domain for _, ex in examples))
    return ExampleSet(
        path=path,
        ids=tuple(ex.id for _, ex in examples),
        groups=tuple(ex.domain for _, ex in examples),
        locations=tuple(loc for loc, _ in examples),
        tokenized=tuple(by_id[ex.id] for _, ex in examples),
        group_names=names,
    )


@dataclasses.dataclass(frozen=True)
class InfluenceScores:
    """Scores of one query set against the training set (units: module docstring)."""

    scores: np.ndarray  # [N, Q]
    train: ExampleSet
    query: ExampleSet
    alpha: alpha_lib.InfluenceResult
    stderr: np.ndarray  # [rows, domains] of α
    train_weights: np.ndarray  # [N] w_n
    query_weights: np.ndarray  # [Q] w_q
    settings: Settings
    damping: dict  # path → absolute λ_b used
    timings: dict
    factors_file: str | None = None
    model_path: str = ""

    def mean_scores(self) -> np.ndarray:
        """[N] each training example's score averaged over the queries."""
        return self.scores.mean(axis=1)

    def rows(self) -> list[dict]:
        """scores.jsonl: one row per training example, in the training file's order."""
        mean = self.mean_scores()
        return [
            {
                "index": n,
                "id": self.train.ids[n],
                "domain": self.train.groups[n],
                "record": self.train.locations[n],
                "tokens": int(self.train_weights[n]),
                "mean": float(mean[n]),
                "scores": {q: float(s) for q, s in zip(self.query.ids, self.scores[n])},
            }
            for n in range(len(self.train))
        ]

    def summary(self) -> dict:
        w_bar = float(np.mean(self.train_weights))
        return {
            "model": self.settings_json()["model"],
            "train": self.train.path,
            "query": self.query.path,
            "train_examples": len(self.train),
            "query_ids": list(self.query.ids),
            "query_capabilities": list(self.query.groups),
            "query_tokens": [int(w) for w in self.query_weights],
            "mean_train_tokens": w_bar,
            "settings": self.settings_json()["settings"],
            "damping_per_layer": {p: float(v) for p, v in self.damping.items()},
            "units": {
                "score": "S[n,q] = -grad(mean loss of train n) . (H + damping)^-1 grad(mean loss "
                "of query q); negative = helpful (upweighting n lowers q's loss)",
                "curvature": "of the token-weighted mean training loss over the whole set",
                "kronfluence_score": "-(tokens_n * tokens_q / mean_train_tokens) * S[n,q] "
                "with kronfluence damping_factor = mean_train_tokens * absolute damping "
                "(docs/influence_conventions.md)",
            },
            "factors_file": self.factors_file,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def settings_json(self) -> dict:
        return {"model": self.model_path, "settings": dataclasses.asdict(self.settings)}

    def write(self, out_dir: str, *, overwrite: bool = False) -> dict[str, str]:
        """Writes scores.jsonl, scores.npy, alpha.json and analysis.json into `out_dir`.

        Refuses (InputError) when any of them exists unless `overwrite`; every file is written to
        a temporary name and renamed into place once all are written, so a failure never leaves a
        half-written file or destroys an earlier result.
        """
        names = ("scores.jsonl", "scores.npy", "alpha.json", "analysis.json")
        paths = {n: os.path.join(out_dir, n) for n in names}
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing and not overwrite:
            raise InputError(
                "results already exist here; choose another output directory or overwrite",
                path=existing[0],
            )
        os.makedirs(out_dir, exist_ok=True)
        tmp = {n: f"{p}.tmp.{os.getpid()}" for n, p in paths.items()}
        with open(tmp["scores.jsonl"], "w") as f:
            for row in self.rows():
                f.write(json.dumps(row) + "\n")
        with open(tmp["scores.npy"], "wb") as f:
            np.save(f, self.scores.astype(np.float32))
        alpha = self.alpha.to_json()
        alpha["stderr"] = alpha_lib._nested(self.stderr)
        write_json_atomic(tmp["alpha.json"], alpha)
        write_json_atomic(tmp["analysis.json"], self.summary())
        for n in names:
            os.replace(tmp[n], paths[n])
        return paths


def to_kronfluence_scores(
    scores_nq: np.ndarray,
    train_weights_n: Sequence[float],
    query_weights_q: Sequence[float],
    mean_train_weight: float | None = None,
) -> np.ndarray:
    """ideal_jax scores [N, Q] → Kronfluence's pairwise scores [Q, N] for the same damping.

    Kronfluence: S_K[q, n] = ∇f_q · (H_K + λ_K)⁻¹ ∇ℓ_n with summed losses (f_q = Σ_t w_t ℓ_t of the
    query, ℓ_n the same of the training example) and H_K = (1/N) Σ_n (per-example curvature of the
    summed loss); positive = helpful. Ours: S[n, q] = −∇ℓ̄_n · (H + λ)⁻¹ ∇L̄_q with mean losses
    (ℓ̄_n = ℓ_n / w_n, L̄_q = f_q / w_q) and H = H_K / w̄, w̄ = W / N the mean training tokens. So
    (H + λ)⁻¹ = w̄ (H_K + w̄ λ)⁻¹ and, with λ_K = w̄ λ (`to_kronfluence_damping`),
        S_K[q, n] = −(w_n w_q / w̄) S[n, q].
    """
    w_n = np.asarray(train_weights_n, np.float64)
    w_q = np.asarray(query_weights_q, np.float64)
    w_bar = float(np.mean(w_n)) if mean_train_weight is None else float(mean_train_weight)
    return (-(w_n[:, None] * w_q[None, :] / w_bar) * np.asarray(scores_nq, np.float64)).T


def to_kronfluence_damping(absolute_damping: float, mean_train_weight: float) -> float:
    """Our absolute λ (units of the mean-loss curvature) → Kronfluence's `damping_factor`
    (units of its per-example summed-loss curvature): λ_K = w̄ λ. A relative damping (our
    `damping` × mean eigenvalue, Kronfluence's `damping_factor=None` = 0.1 × mean eigenvalue) is
    unit-free: the same factor on both sides gives the same preconditioner."""
    return float(absolute_damping) * float(mean_train_weight)
