"""From volume parameters β to a resampled training mixture (METHOD.md §1.2).

D_0 (`build_mixture`): domain i gets |D_i'| = floor((1 + β_i) |D_i|) examples of its source by
random resampling: downsampling draws without replacement; upsampling keeps whole copies of the
domain plus a remainder drawn without replacement. With `keep_total` all targets are rescaled so the
total stays N = Σ|D_i| (largest-remainder rounding, the unrounded targets are recorded).

D_k+1 (`resample_from`): nested — a smaller volume drops entries of D_k, a larger one keeps D_k
whole and adds entries. β = 0 (same volume) reproduces D_k exactly, so the mixture only changes
where the step says so. What a growing domain adds is the `upsample` policy (data.upsample):
  repeat       duplicates of D_k's own entries (the paper's behaviour);
  fresh_first  examples of the domain's pool (its whole source file, of which D_0 may hold only a
               share: data.initial_sizes) that D_k does not hold yet, drawn at random; entries are
               repeated only once the pool is exhausted.
A mixture built with a pool records per domain its pool size, the examples the step took fresh,
the repeated entries and the pool's unused examples (mixture.json).

Resampling depends only on (seed, domain name), never on the number of hosts; hosts then take
interleaved slices of one global, seeded order (`host_shard`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from ideal_jax.data.records import Example
from ideal_jax.utils.atomic import atomic_file
from ideal_jax.utils.errors import InputError

T = TypeVar("T")
MANIFEST_FORMAT = "ideal_jax.mixture.v1"
UPSAMPLE_POLICIES = ("fresh_first", "repeat")
# floor((1 + β) n) must not lose an example to float error: (1 - 0.9) * 10 = 0.9999999999999998.
_FLOOR_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A resampled mixture: per domain the chosen example ids (with repeats), in source order."""

    domain_names: tuple[str, ...]
    source_sizes: tuple[int, ...]
    target_sizes: tuple[int, ...]
    beta: tuple[float, ...]
    seed: int
    keep_total: bool
    example_ids: tuple[tuple[str, ...], ...]
    unrounded_targets: tuple[float, ...]  # before flooring / largest-remainder rounding
    # The step that produced this mixture from the previous round's (zeros for D_0):
    step_beta: tuple[float, ...] = ()  # applied: volume / previous volume − 1
    step_beta_nominal: tuple[float, ...] = ()  # what the reweight rule asked for (continuous)
    # With a pool (data.upsample = fresh_first, or D_0 a share of its source): per domain the
    # pool's size and how many of this mixture's examples the step took fresh from it.
    pool_sizes: tuple[int, ...] = ()
    fresh: tuple[int, ...] = ()
    upsample: str = "repeat"

    @property
    def total(self) -> int:
        return sum(self.target_sizes)

    def to_manifest(self) -> dict[str, Any]:
        """mixture.json (DESIGN.md): sizes, β, weight, seed, repeat counts per domain; the ids."""
        domains = {}
        for k, name in enumerate(self.domain_names):
            repeats = Counter(Counter(self.example_ids[k]).values())
            repeats[0] = self.source_sizes[k] - len(set(self.example_ids[k]))
            domains[name] = {
                "source_size": self.source_sizes[k],
                "target_size": self.target_sizes[k],
                "target_unrounded": self.unrounded_targets[k],
                "beta": self.beta[k],
                "weight": 1.0 + self.beta[k],
                "step_beta": self.step_beta[k] if self.step_beta else 0.0,
                "step_beta_nominal": self.step_beta_nominal[k] if self.step_beta_nominal else 0.0,
                "repeat_counts": {str(r): repeats[r] for r in sorted(repeats)},
            }
            if self.pool_sizes:  # absent without a pool: such manifests are as they always were
                distinct = len(set(self.example_ids[k]))
                domains[name].update(
                    pool_size=self.pool_sizes[k],
                    fresh=self.fresh[k] if self.fresh else 0,
                    repeated=len(self.example_ids[k]) - distinct,
                    unused=self.pool_sizes[k] - distinct,
                )
        extra = {"upsample": self.upsample} if self.pool_sizes else {}
        return {
            "format": MANIFEST_FORMAT,
            "seed": self.seed,
            "keep_total": self.keep_total,
            **extra,
            "total_source": sum(self.source_sizes),
            "total_target": self.total,
            "domains": domains,
            "example_ids": {n: list(ids) for n, ids in zip(self.domain_names, self.example_ids)},
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], path: str | None = None) -> Mixture:
        """Inverse of `to_manifest`; `path` only names the file in error messages."""
        try:
            domains = manifest["domains"]
            names = tuple(domains)
            ids = tuple(tuple(manifest["example_ids"][n]) for n in names)
            mixture = cls(
                domain_names=names,
                source_sizes=tuple(int(domains[n]["source_size"]) for n in names),
                target_sizes=tuple(int(domains[n]["target_size"]) for n in names),
                beta=tuple(float(domains[n]["beta"]) for n in names),
                seed=int(manifest["seed"]),
                keep_total=bool(manifest["keep_total"]),
                example_ids=ids,
                unrounded_targets=tuple(float(domains[n]["target_unrounded"]) for n in names),
                step_beta=tuple(float(domains[n].get("step_beta", 0.0)) for n in names),
                step_beta_nominal=tuple(
                    float(domains[n].get("step_beta_nominal", 0.0)) for n in names
                ),
                pool_sizes=tuple(int(domains[n]["pool_size"]) for n in names)
                if all("pool_size" in domains[n] for n in names) and names
                else (),
                fresh=tuple(int(domains[n].get("fresh", 0)) for n in names)
                if all("pool_size" in domains[n] for n in names) and names
                else (),
                upsample=str(manifest.get("upsample", "repeat")),
            )
        except KeyError as e:
            raise InputError("missing field in mixture manifest", path=path, field=e.args[0]) from e
        for name, size, chosen in zip(names, mixture.target_sizes, ids):
            if len(chosen) != size:
                raise InputError(
                    f"{len(chosen)} ids but target_size {size}",
                    path=path,
                    record=name,
                    field="example_ids",
                )
        return mixture


def compute_target_sizes(
    source_sizes: Sequence[int], beta: Sequence[float], keep_total: bool = False
) -> tuple[list[int], list[float]]:
    """Integer targets floor((1 + β_i)|D_i|) (or rescaled to total N) and the unrounded values."""
    sizes = np.asarray(source_sizes, dtype=np.float64)
    weights = 1.0 + np.asarray(beta, dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise InputError(f"β must be finite and >= -1, got {list(beta)}", field="beta")
    raw = weights * sizes
    if not keep_total:
        return [int(math.floor(x + _FLOOR_EPS)) for x in raw], raw.tolist()
    total_n = int(sizes.sum())
    if raw.sum() <= 0:
        raise InputError("keep_total with every domain weighted to 0", field="beta")
    scaled = raw * total_n / raw.sum()
    floors = np.floor(scaled + _FLOOR_EPS).astype(np.int64)
    # Largest remainder: hand the missing examples to the largest fractional parts (ties: first).
    missing = total_n - int(floors.sum())
    order = np.argsort(-(scaled - floors), kind="stable")
    if missing >= 0:
        floors[order[:missing]] += 1
    else:  # the epsilon rounded some up too far: take back from the smallest remainders
        floors[order[missing:]] -= 1
    return floors.tolist(), scaled.tolist()


def resample_indices(n: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into a domain of size n: whole copies + a remainder without replacement, sorted."""
    if target == n:
        return np.arange(n)  # β = 0 (or rounding back to n): the identity, no randomness used
    if n == 0:
        return np.zeros(0, np.int64)
    copies, remainder = divmod(target, n)
    extra = rng.choice(n, size=remainder, replace=False)
    return np.sort(np.concatenate([np.tile(np.arange(n), copies), extra]), kind="stable")


def _domain_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def build_mixture(
    domain_ids: Mapping[str, Sequence[str]],
    beta: Mapping[str, float] | Sequence[float] | None = None,
    *,
    seed: int,
    keep_total: bool = False,
    pools: Mapping[str, Sequence[str]] | None = None,
    upsample: str = "repeat",
) -> Mixture:
    """Resamples each domain's ids to its target volume; `beta=None` is the β = 0 mixture.

    pools: each domain's whole source, of which `domain_ids` is a share; the mixture then
    records the pool sizes and the `upsample` policy later steps grow domains with."""
    names = tuple(domain_ids)
    if beta is None:
        beta_values = [0.0] * len(names)
    elif isinstance(beta, Mapping):
        unknown = sorted(set(beta) - set(names))
        if unknown:
            raise InputError(
                f"β names unknown domains {unknown}; domains are {list(names)}", field="beta"
            )
        beta_values = [float(beta.get(n, 0.0)) for n in names]
    else:
        beta_values = [float(b) for b in beta]
        if len(beta_values) != len(names):
            raise InputError(f"{len(beta_values)} β values for {len(names)} domains", field="beta")
    sources = [list(domain_ids[n]) for n in names]
    targets, unrounded = compute_target_sizes([len(s) for s in sources], beta_values, keep_total)
    chosen = []
    for name, ids, target in zip(names, sources, targets):
        idx = resample_indices(len(ids), target, _domain_rng(seed, name))
        chosen.append(tuple(ids[i] for i in idx))
    return Mixture(
        domain_names=names,
        source_sizes=tuple(len(s) for s in sources),
        target_sizes=tuple(targets),
        beta=tuple(beta_values),
        seed=seed,
        keep_total=keep_total,
        example_ids=tuple(chosen),
        unrounded_targets=tuple(unrounded),
        step_beta=(0.0,) * len(names),  # a first mixture has no previous round
        step_beta_nominal=(0.0,) * len(names),
        pool_sizes=tuple(len(pools[n]) for n in names) if pools else (),
        fresh=(0,) * len(names) if pools else (),
        upsample=upsample if pools else "repeat",
    )


def resample_from(
    mixture: Mixture,
    volumes: Sequence[int],
    *,
    seed: int,
    beta_nominal: Sequence[float] | None = None,
    pools: Mapping[str, Sequence[str]] | None = None,
    upsample: str = "repeat",
) -> Mixture:
    """D_k+1 from D_k = `mixture`: each domain's entries (with their repeats) dropped or grown.

    volume < |D_k,j|: drops |D_k,j| − volume entries of D_k,j, chosen at random;
    volume = |D_k,j|: D_k,j unchanged;
    volume > |D_k,j|: keeps D_k,j whole and adds volume − |D_k,j| entries — with
      upsample="repeat" (or no pool) duplicates: D_k,j whole `copies` times plus a random
      remainder of its entries; with upsample="fresh_first" first examples of the domain's pool
      (`pools[name]`, its whole source) that D_k,j does not hold, drawn at random, and only when
      the pool is exhausted duplicates of the entries (D_k,j and the fresh ones) as above.
    Deterministic in (seed, domain name). The recorded β is cumulative relative to the sources
    (weight = volume / source size); the step's applied β (volume / |D_k,j| − 1) and the rule's
    nominal β are recorded beside it.
    """
    if upsample not in UPSAMPLE_POLICIES:
        raise InputError(
            f"unknown upsample policy {upsample!r}; one of {UPSAMPLE_POLICIES}",
            field="data.upsample",
        )
    volumes = [int(v) for v in volumes]
    if len(volumes) != len(mixture.domain_names) or min(volumes, default=0) < 0:
        raise InputError(
            f"need {len(mixture.domain_names)} volumes ≥ 0, got {volumes}", field="volumes"
        )
    pool_of = pools if pools is not None else {}
    chosen, applied, fresh_counts = [], [], []
    for name, ids, volume in zip(mixture.domain_names, mixture.example_ids, volumes):
        n = len(ids)
        rng = _domain_rng(seed, name)
        fresh: list[str] = []
        if upsample == "fresh_first" and volume > n and name in pool_of:
            held = set(ids)
            unused = [i for i in pool_of[name] if i not in held]
            take = min(volume - n, len(unused))
            fresh = [unused[i] for i in np.sort(rng.choice(len(unused), size=take, replace=False))]
        base = tuple(ids) + tuple(fresh)
        m = len(base)
        if m == 0 and volume > 0:
            raise InputError(f"domain {name!r} is empty and cannot grow", record=name)
        if volume <= m:
            keep = np.sort(rng.choice(m, size=volume, replace=False))
        else:
            copies, remainder = divmod(volume, m)
            extra = rng.choice(m, size=remainder, replace=False)
            keep = np.sort(np.concatenate([np.tile(np.arange(m), copies), extra]), kind="stable")
        chosen.append(tuple(base[i] for i in keep))
        applied.append(volume / max(n, 1) - 1.0)
        fresh_counts.append(len(fresh))
    nominal = applied if beta_nominal is None else [float(b) for b in beta_nominal]
    with_pool = bool(pools) or bool(mixture.pool_sizes)
    pool_sizes = (
        tuple(
            len(pool_of[n])
            if n in pool_of
            else (mixture.pool_sizes[k] if mixture.pool_sizes else 0)
            for k, n in enumerate(mixture.domain_names)
        )
        if with_pool
        else ()
    )
    return Mixture(
        domain_names=mixture.domain_names,
        source_sizes=mixture.source_sizes,
        target_sizes=tuple(volumes),
        beta=tuple(v / max(s, 1) - 1.0 for v, s in zip(volumes, mixture.source_sizes)),
        seed=seed,
        keep_total=mixture.keep_total,
        example_ids=tuple(chosen),
        unrounded_targets=tuple((1.0 + b) * n for b, n in zip(nominal, mixture.target_sizes)),
        step_beta=tuple(applied),
        step_beta_nominal=tuple(nominal),
        pool_sizes=pool_sizes,
        fresh=tuple(fresh_counts) if with_pool else (),
        upsample=upsample if with_pool else "repeat",
    )


def initial_shares(
    pools: Mapping[str, Sequence[str]], sizes: Mapping[str, int], *, seed: int
) -> dict[str, list[str]]:
    """D_0's share of each domain's pool: `sizes[name]` examples drawn at random without
    replacement (in pool order; deterministic in (seed, name)); a domain not in `sizes`, or with
    size 0, keeps its whole pool. A share larger than its pool is refused, naming both sizes."""
    unknown = sorted(set(sizes) - set(pools))
    if unknown:
        raise InputError(
            f"names domains that are not training domains: {unknown}; domains: {list(pools)}",
            field="data.initial_sizes",
        )
    out = {}
    for name, ids in pools.items():
        n = int(sizes.get(name, 0) or 0)
        if n < 0:
            raise InputError(f"domain {name!r}: {n} < 0", field=f"data.initial_sizes.{name}")
        if n > len(ids):
            raise InputError(
                f"domain {name!r}: D0 asks for {n} examples but its source holds {len(ids)}",
                field=f"data.initial_sizes.{name}",
            )
        if not n or n == len(ids):
            out[name] = list(ids)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(f"d0:{name}".encode())])
        out[name] = [ids[i] for i in np.sort(rng.choice(len(ids), size=n, replace=False))]
    return out


def global_order(mixture: Mixture) -> list[tuple[str, str]]:
    """All (domain, id) entries of the mixture in one seeded shuffled order, equal on every host."""
    entries = [(n, i) for n, ids in zip(mixture.domain_names, mixture.example_ids) for i in ids]
    perm = np.random.default_rng([mixture.seed, len(entries)]).permutation(len(entries))
    return [entries[k] for k in perm]


def host_shard(mixture_ids: Sequence[T], host_index: int, host_count: int) -> list[T]:
    """This host's interleaved slice of the global order; the slices over hosts partition it."""
    if not 0 <= host_index < host_count:
        raise ValueError(f"host_index={host_index} outside [0, {host_count})")
    return list(mixture_ids[host_index::host_count])


def _default_id(item: Any) -> str:
    return item.example_id if hasattr(item, "example_id") else item.id


def materialize(
    mixture: Mixture,
    items_by_domain: Mapping[str, Sequence[T]],
    id_of: Callable[[Any], str] = _default_id,
) -> list[T]:
    """The mixture's items (Examples or TokenizedExamples), repeats included, domain by domain.

    Items absent from `items_by_domain` (e.g. dropped by truncation) are skipped.
    """
    out: list[T] = []
    for name, ids in zip(mixture.domain_names, mixture.example_ids):
        if name not in items_by_domain:
            raise InputError(f"unknown domain {name!r} in mixture", field="domains")
        by_id = {id_of(item): item for item in items_by_domain[name]}
        out.extend(by_id[i] for i in ids if i in by_id)
    return out


def _write_atomic(path: str | os.PathLike, text_lines: Sequence[str] | str) -> None:
    with atomic_file(path) as f:  # readers see the old file or the new one, never half of one
        if isinstance(text_lines, str):
            f.write(text_lines)
        else:
            f.writelines(text_lines)


def write_manifest(mixture: Mixture, path: str | os.PathLike) -> None:
    """Writes mixture.json atomically."""
    _write_atomic(path, json.dumps(mixture.to_manifest(), indent=1) + "\n")


def read_manifest(path: str | os.PathLike) -> Mixture:
    with open(path, encoding="utf-8") as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON at line {e.lineno}: {e.msg}", path=str(path)) from e
    return Mixture.from_manifest(manifest, path=os.fspath(path))


def export_jsonl(
    mixture: Mixture, examples: Mapping[str, Sequence[Example]], path: str | os.PathLike
) -> int:
    """Writes the mixture as plain chat records in its global order (final_mixture.jsonl).

    Each line: {"id", "domain", "messages": [..., {"role": "assistant", "content": response}]}.
    Repeated copies get ids "ID#1", "ID#2", ... (and "source_id": ID) so every line has a unique id
    and the file loads back through `load_domains`. Returns the number of records written.
    """
    lookup = {name: {ex.id: ex for ex in examples.get(name, ())} for name in mixture.domain_names}
    copies: Counter[tuple[str, str]] = Counter()
    lines = []
    for domain, example_id in global_order(mixture):
        if example_id not in lookup[domain]:
            raise InputError(
                f"mixture id {example_id!r} not among the loaded examples",
                record=domain,
                field="id",
            )
        ex = lookup[domain][example_id]
        copy = copies[domain, example_id]
        copies[domain, example_id] += 1
        record = {"id": ex.id if copy == 0 else f"{ex.id}#{copy}", "domain": domain}
        if copy:
            record["source_id"] = ex.id
        record["messages"] = ex.chat_messages()
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    _write_atomic(path, lines)
    return len(lines)
