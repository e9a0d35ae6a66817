"""DaaR selection (METHOD.md §2.5): keep the pool examples with the highest predicted diversity.

`select_top_fraction`: the top `fraction` (default 20%) of the pool by ψ_div score.
`select_customized`: per pseudo-domain, the top `target_fraction` (50%) of a target domain and the
top `other_fraction` (10%) of every other domain, for a user who wants one capability emphasized.
`select_per_domain`: the top `fraction` within every pseudo-domain (not in the paper). On a pool
whose domains are cleanly separated, the global top-p% concentrates on the most ambiguous
pseudo-domain (measured on the demo suite: 133 of 150 selected from one of 5 capabilities), which
is the opposite of a balanced mix; the stratified variant keeps the pool's domain proportions and
ranks by diversity only within each domain.
`select_farthest_point`: k-center greedy on the probe features, the diversity baseline DaaR is
compared with (benchmarks/daar_selection.py); not part of DaaR.
Ties are broken by pool index, so a selection is a pure function of (scores, labels, fractions).

`write_selection` writes a JSON manifest (method, fractions, counts per pseudo-domain, seed,
selected ids with scores) and the selected records as chat-form JSONL that `ideal_jax.data.records`
reads back (`domain` = the pseudo-domain, `source_domain` = the label the record came with), both
written atomically (artifacts.write_json, store.write_text).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ideal_jax import artifacts
from ideal_jax.daar import store
from ideal_jax.data.records import Example
from ideal_jax.utils.errors import InputError


def _top(indices_n: np.ndarray, scores_n: np.ndarray, count: int) -> np.ndarray:
    # lexsort: primary key -score (descending), secondary key the pool index (ascending).
    order = np.lexsort((indices_n, -scores_n[indices_n]))
    return indices_n[order[:count]]


def _count(n: int, fraction: float) -> int:
    """How many of n to keep: round half up, at least one of a non-empty group."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"selection fraction must be in (0, 1], got {fraction}", field="daar")
    return min(n, max(1, math.floor(n * fraction + 0.5))) if n else 0


def select_top_fraction(scores_n: np.ndarray, fraction: float) -> np.ndarray:
    """Pool indices of the top `fraction` by score, best first."""
    scores_n = np.asarray(scores_n, np.float64)
    return _top(np.arange(len(scores_n)), scores_n, _count(len(scores_n), fraction))


def select_customized(
    scores_n: np.ndarray,
    labels_n: np.ndarray,
    target: int,
    *,
    target_fraction: float = 0.5,
    other_fraction: float = 0.1,
) -> np.ndarray:
    """Pool indices: top `target_fraction` of pseudo-domain `target`, `other_fraction` of the rest.

    Grouped by pseudo-domain index, best first within each group.
    """
    scores_n = np.asarray(scores_n, np.float64)
    labels_n = np.asarray(labels_n)
    chosen = []
    for k in np.unique(labels_n):
        members = np.flatnonzero(labels_n == k)
        fraction = target_fraction if k == target else other_fraction
        chosen.append(_top(members, scores_n, _count(len(members), fraction)))
    return np.concatenate(chosen) if chosen else np.zeros((0,), np.int64)


def select_per_domain(scores_n: np.ndarray, labels_n: np.ndarray, fraction: float) -> np.ndarray:
    """Pool indices: the top `fraction` of every pseudo-domain (grouped, best first in each)."""
    return select_customized(
        scores_n, labels_n, target=-1, target_fraction=fraction, other_fraction=fraction
    )


def select_farthest_point(features_nd: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Pool indices of a k-center (farthest-point) selection: a diversity baseline for DaaR.

    Greedy 2-approximation of k-center (Gonzalez 1985): start at a seeded random example, then
    repeatedly add the example farthest (Euclidean, on per-dimension standardized features) from
    everything selected so far. Exact duplicates are at distance 0, so none is picked twice before
    every distinct example is. Ties go to the lowest index.
    """
    x_nd = np.asarray(features_nd, np.float64)
    n = len(x_nd)
    count = min(int(count), n)
    if count <= 0:
        return np.zeros((0,), np.int64)
    x_nd = (x_nd - x_nd.mean(axis=0)) / np.maximum(x_nd.std(axis=0), 1e-12)
    chosen = [int(np.random.default_rng(seed).integers(n))]
    dist_n = np.sum((x_nd - x_nd[chosen[0]]) ** 2, axis=1)
    dist_n[chosen[0]] = -1.0  # never again: once all distances are 0, copies come next
    for _ in range(count - 1):
        i = int(np.argmax(dist_n))  # first index among ties
        chosen.append(i)
        dist_n = np.minimum(dist_n, np.sum((x_nd - x_nd[i]) ** 2, axis=1))
        dist_n[i] = -1.0
    return np.array(chosen, np.int64)


def choose(
    scores_n: np.ndarray,
    labels_n: np.ndarray,
    domain_names: Sequence[str],
    *,
    method: str = "top_fraction",
    fraction: float = 0.2,
    customized_target: str | None = None,
    customized_fractions: tuple[float, float] = (0.5, 0.1),
) -> tuple[np.ndarray, str, dict[str, float]]:
    """(selected pool indices, method name, fractions) as configured; a target means customized."""
    if customized_target is not None:
        target_fraction, other_fraction = customized_fractions
        picked = select_customized(
            scores_n,
            labels_n,
            list(domain_names).index(customized_target),
            target_fraction=target_fraction,
            other_fraction=other_fraction,
        )
        return picked, "customized", {customized_target: target_fraction, "other": other_fraction}
    if method == "per_domain":
        return select_per_domain(scores_n, labels_n, fraction), method, {"each": fraction}
    return select_top_fraction(scores_n, fraction), "top_fraction", {"all": fraction}


def histogram(labels_n: np.ndarray, k: int) -> np.ndarray:
    """[K] normalized histogram of labels 0..K-1."""
    counts = np.bincount(np.asarray(labels_n, np.int64), minlength=k).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def kl_to_uniform(labels_n: np.ndarray, k: int) -> float:
    """KL(histogram || uniform) in nats: 0 for a perfectly even domain mix, log K at worst."""
    p = histogram(labels_n, k)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] * k)))


def record_of(example: Example, pseudo_domain: str, score: float) -> dict[str, Any]:
    """A chat-form JSONL record that `ideal_jax.data.records` reads back."""
    record: dict[str, Any] = {
        "id": example.id,
        "domain": pseudo_domain,
        "source_domain": example.domain,
        "messages": example.chat_messages(),
        "daar_score": float(score),
    }
    if example.capability is not None:
        record["capability"] = example.capability
    return record


def manifest_of(
    examples: Sequence[Example],
    selected_n: np.ndarray,
    scores_n: np.ndarray,
    labels_n: np.ndarray,
    domain_names: Sequence[str],
    *,
    method: str,
    fractions: dict[str, float],
    seed: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The selection's manifest: method, fractions, counts per pseudo-domain, selected ids."""
    k = len(domain_names)
    selected_n = np.asarray(selected_n, np.int64)
    pool_counts = np.bincount(np.asarray(labels_n, np.int64), minlength=k)
    sel_counts = np.bincount(np.asarray(labels_n, np.int64)[selected_n], minlength=k)
    return {
        "method": method,
        "fractions": fractions,
        "seed": int(seed),
        "n_pool": len(examples),
        "n_selected": int(len(selected_n)),
        "domains": list(domain_names),
        "pool_counts_per_pseudo_domain": {d: int(c) for d, c in zip(domain_names, pool_counts)},
        "counts_per_pseudo_domain": {d: int(c) for d, c in zip(domain_names, sel_counts)},
        "mean_score_pool": float(np.mean(scores_n)) if len(scores_n) else None,
        "mean_score_selected": float(np.mean(scores_n[selected_n])) if len(selected_n) else None,
        "selected": [
            {
                "id": examples[i].id,
                "score": float(scores_n[i]),
                "pseudo_domain": domain_names[int(labels_n[i])],
            }
            for i in selected_n
        ],
        **(extra or {}),
    }


def write_selection_files(
    out_dir: str | os.PathLike, examples: Sequence[Example], manifest: dict[str, Any]
) -> tuple[str, str]:
    """Writes selected.jsonl (the manifest's selected examples as records) and manifest.json."""
    out_dir = os.fspath(out_dir)
    manifest_path = os.path.join(out_dir, "manifest.json")
    records_path = os.path.join(out_dir, "selected.jsonl")
    by_id = {ex.id: ex for ex in examples}
    lines = [
        json.dumps(record_of(by_id[s["id"]], s["pseudo_domain"], s["score"]))
        for s in manifest["selected"]
    ]
    # Records first, manifest last: a manifest on disk means the selection is complete.
    store.write_text(records_path, "".join(line + "\n" for line in lines))
    artifacts.write_json(manifest_path, manifest)
    return manifest_path, records_path


def write_selection(
    out_dir: str | os.PathLike,
    examples: Sequence[Example],
    selected_n: np.ndarray,
    scores_n: np.ndarray,
    labels_n: np.ndarray,
    domain_names: Sequence[str],
    *,
    method: str,
    fractions: dict[str, float],
    seed: int,
    extra: dict[str, Any] | None = None,
) -> tuple[str, str]:
    """Writes manifest.json and selected.jsonl under `out_dir`; returns their paths."""
    manifest = manifest_of(
        examples,
        selected_n,
        scores_n,
        labels_n,
        domain_names,
        method=method,
        fractions=fractions,
        seed=seed,
        extra=extra,
    )
    return write_selection_files(out_dir, examples, manifest)
