"""DaaR end to end (METHOD.md §2): generate → centroids → pseudo-labels → probes → scores → select.

`run_daar` runs the stages in order; each writes its output under `workdir` atomically and is
skipped when that output already exists, so an interrupted run resumes where it stopped. The
workdir remembers the config and a fingerprint of the pool / probe ids it was made with and refuses
to resume with different ones.

Workdir layout:
  config.json                 the DaarConfig + pool/probe fingerprints
  generation.json        "generate": accepted pairs and per-domain generation stats
  centroids.npz          "centroids": centroids_kd
  pseudo_labels.npz      "pseudo_labels": probe-set k-means labels, centres, convergence info
  probe_domain.npz, probe_diversity.npz, probe_stats.json    "probes"
  scores.npz             "scores": ψ_div score, ψ_dom entropy and argmax per pool example
  selection/manifest.json, selection/selected.jsonl          "select"

Config fields: every field of `DaarConfig` (its comments give the meaning; configs/common.py's
cfg.daar has the same defaults). domains: list of {name, description, tau (None: 0.9 if "math" is
in the name, else 0.85)}.

Probe stage: ψ_dom is trained on the probe set's pseudo-labels (cfg.daar.probe_*); ψ_div regresses
ψ_dom's entropy *cross-fitted* (probe_cross_fit_folds folds: each example's entropy comes from a
ψ_dom trained without its fold), so that it learns the uncertainty ψ_dom has on unseen pool
examples rather than the near-zero entropy of its own training examples.

`pseudo_domains` labels any examples with the trained ψ_dom, so IDEAL can run on an unlabeled pool
with DaaR's pseudo-domains as its domains (`relabel` groups examples by them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ideal_jax.daar import centroids as cen
from ideal_jax.daar import generation as gen
from ideal_jax.daar import kmeans as km
from ideal_jax.daar import probes as pr
from ideal_jax.daar import selection as sel
from ideal_jax.data.records import Example
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import Params
from ideal_jax.utils.errors import InputError

STAGES = ("generate", "centroids", "pseudo_labels", "probes", "scores", "select")


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    name: str
    description: str  # one sentence, shown to the generator
    tau: float  # similarity threshold for accepting a generated pair


def _tau(domain: str, tau: Any) -> float:
    """The domain's τ: given, else the paper's 0.9 for math and 0.85 for the rest; in (0, 1]."""
    if tau is None:
        return 0.9 if "math" in domain.lower() else 0.85
    try:
        value = float(tau)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise InputError(
            f"domain {domain!r}: tau (the similarity threshold) must be in (0, 1], got {tau!r}",
            field=f"daar.tau.{domain}",
        )
    return value


@dataclasses.dataclass(frozen=True)
class DaarConfig:
    """cfg.daar as a typed, validated value.

    The defaults equal configs/common.py's cfg.daar (tests/test_daar_config.py keeps them equal);
    docs/method_choices.md (DaaR) says where they differ from the paper and what was measured.
    """

    domains: tuple[DomainSpec, ...]
    seeds_per_domain: int = 5
    target_per_domain: int = 10  # paper: 10-30
    min_per_domain: int = 3  # fewer accepted pairs when the budget is spent: InputError
    max_attempts_per_domain: int = 100  # every generation counts, parseable or not
    counter_examples: int = 3
    seed_temperature: float = 0.9
    augment_temperature: float = 0.95
    top_p: float = 0.95
    max_new_tokens: int = 256
    centroid_source: str = "input"  # paper: input embeddings
    centroid_layer: int = 0  # for centroid_source="hidden"
    feature_layer: int = 3  # probe features: hidden state after this many layers (paper: 3)
    feature_norm: bool = True  # the final RMSNorm on the probe features (public code)
    max_len: int = 256  # tokens embedded per text
    embed_batch_size: int = 64
    kmeans_metric: str = "euclidean"  # paper (sklearn KMeans); "cosine" = spherical
    kmeans_max_iters: int = 100
    probe_lr: float = 1e-3  # paper: 1e-5 (measured: 0.77 vs 0.97 val accuracy, method_choices)
    probe_epochs: int = 20  # paper: 1
    probe_batch_size: int = 32  # paper: 1
    probe_hidden: tuple[int, ...] = ()  # (): the paper's 2d, d, d/2, 256
    probe_val_fraction: float = 0.03  # paper: 97/3
    probe_weight_decay: float = 0.0  # paper: none (Adam)
    probe_patience: int = 0  # early stopping after this many epochs without a better val loss
    probe_cross_fit_folds: int = 5  # ψ_div's entropy targets from held-out folds; 0: in-sample
    select_fraction: float = 0.2
    select_method: str = "top_fraction"  # paper; "per_domain" = top fraction within each domain
    customized_target: str | None = None
    customized_fractions: tuple[float, float] = (0.5, 0.1)
    seed: int = 0

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    @classmethod
    def from_config(cls, section: Any) -> DaarConfig:
        """From an ml_collections section or a dict; bad values raise InputError (named field)."""
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        raw_domains = values.pop("domains", None)
        if not raw_domains:
            raise InputError(
                "at least one domain {name: one-sentence description} is required (the domain "
                "description list is empty)",
                field="daar.domains",
            )
        domains = []
        for i, d in enumerate(raw_domains):
            d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
            name, description = d.get("name"), d.get("description")
            if not isinstance(name, str) or not name:
                raise InputError(f"domain {i} needs a non-empty 'name'", field=f"daar.domains[{i}]")
            if not isinstance(description, str) or not description.strip():
                raise InputError(
                    f"domain {name!r} needs a non-empty one-sentence description",
                    field=f"daar.domains.{name}",
                )
            domains.append(DomainSpec(name, description, _tau(name, d.get("tau"))))
        if len({d.name for d in domains}) != len(domains):
            raise InputError("domain names must be unique", field="daar.domains")
        for key in ("probe_hidden", "customized_fractions"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if values.get("probe_hidden") is None:
            values.pop("probe_hidden", None)
        if values.get("customized_target") == "":
            values["customized_target"] = None
        cfg = cls(domains=tuple(domains), **values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """InputError naming the first cfg.daar field whose value cannot work."""
        if self.customized_target is not None and self.customized_target not in self.domain_names:
            raise InputError(
                f"customized_target {self.customized_target!r} is not one of {self.domain_names}",
                field="daar.customized_target",
            )
        choices = {
            "select_method": ("top_fraction", "per_domain"),
            "kmeans_metric": km.METRICS,
            "centroid_source": cen.SOURCES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}",
                    field=f"daar.{name}",
                )
        ranges = {
            "select_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "probe_val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "probe_lr": (lambda v: v > 0, "> 0"),
            "probe_weight_decay": (lambda v: v >= 0, ">= 0"),
            "probe_epochs": (lambda v: v >= 1, ">= 1"),
            "probe_batch_size": (lambda v: v >= 1, ">= 1"),
            "probe_patience": (lambda v: v >= 0, ">= 0"),
            "probe_cross_fit_folds": (lambda v: v == 0 or v >= 2, "0 (off) or >= 2"),
            "seeds_per_domain": (lambda v: v >= 1, ">= 1"),
            "max_attempts_per_domain": (lambda v: v >= 1, ">= 1"),
            "counter_examples": (lambda v: v >= 1, ">= 1"),
            "seed_temperature": (lambda v: v >= 0, ">= 0"),
            "augment_temperature": (lambda v: v >= 0, ">= 0"),
            "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "max_new_tokens": (lambda v: v >= 1, ">= 1"),
            "max_len": (lambda v: v >= 1, ">= 1"),
            "embed_batch_size": (lambda v: v >= 1, ">= 1"),
            "kmeans_max_iters": (lambda v: v >= 1, ">= 1"),
            "centroid_layer": (lambda v: v >= 0, ">= 0"),
        }
        for name, (check, what) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not check(value):
                raise InputError(f"must be {what}, got {value!r}", field=f"daar.{name}")
        if self.probe_patience > 0 and self.probe_val_fraction == 0:
            raise InputError(
                "early stopping needs a validation split: set probe_val_fraction > 0",
                field="daar.probe_patience",
            )
        if not all(0 < f <= 1 for f in self.customized_fractions):
            raise InputError("both fractions must be in (0, 1]", field="daar.customized_fractions")
        if not 1 <= self.min_per_domain <= self.target_per_domain:
            raise InputError(
                "need 1 <= min_per_domain <= target_per_domain", field="daar.min_per_domain"
            )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def generation_kwargs(self) -> dict[str, Any]:
        """Arguments of `generation.generate_domain_pairs` besides the domain itself."""
        names = ("counter_examples", "seed_temperature", "augment_temperature", "top_p")
        return dict(
            seeds=self.seeds_per_domain,
            target=self.target_per_domain,
            min_accepted=self.min_per_domain,
            max_attempts=self.max_attempts_per_domain,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            **{name: getattr(self, name) for name in names},
        )


@dataclasses.dataclass
class DaarResult:
    domain_names: list[str]
    centroids_kd: np.ndarray
    generation_stats: dict[str, dict[str, Any]]
    probe_labels_n: np.ndarray  # k-means pseudo-label per probe example
    probe_stats: dict[str, dict[str, Any]]  # {"domain": ..., "diversity": ..., "kmeans": ...}
    pool_scores_n: np.ndarray  # ψ_div prediction per pool example
    pool_entropy_n: np.ndarray  # H(x) from ψ_dom per pool example
    pool_labels_n: np.ndarray  # argmax ψ_dom per pool example
    selected_n: np.ndarray  # selected pool indices
    manifest_path: str
    selected_path: str
    stages_run: list[str]  # stages computed in this call (the others were loaded)

    @property
    def pool_domains(self) -> list[str]:
        """The pseudo-domain name of every pool example."""
        return [self.domain_names[int(k)] for k in self.pool_labels_n]


def _fingerprint(examples: Sequence[Example]) -> str:
    return hashlib.sha256("\n".join(ex.id for ex in examples).encode()).hexdigest()[:16]


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    sel.atomic_write(path, arrays)  # atomic: a stage output on disk is always complete


def _save_json(path: str, value: Any) -> None:
    sel.atomic_write(path, json.dumps(value, indent=1))


def _load_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_workdir(
    workdir: str, cfg: DaarConfig, pool: Sequence[Example], probe: Sequence[Example]
):
    os.makedirs(workdir, exist_ok=True)
    identity = {"daar": cfg.to_dict(), "pool": _fingerprint(pool), "probe": _fingerprint(probe)}
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        if _load_json(path) != identity:
            raise InputError(
                "this DaaR workdir was made with a different config or pool/probe set; "
                "use a new workdir (or delete it) to start over",
                path=path,
            )
    else:
        _save_json(path, identity)


def probe_kwargs(cfg: DaarConfig) -> dict[str, Any]:
    """`probes.train_probe` settings from the config (both probes and every cross-fit fold)."""
    return dict(
        hidden=cfg.probe_hidden or None,
        lr=cfg.probe_lr,
        epochs=cfg.probe_epochs,
        batch_size=cfg.probe_batch_size,
        val_fraction=cfg.probe_val_fraction,
        weight_decay=cfg.probe_weight_decay,
        patience=cfg.probe_patience,
        seed=cfg.seed,
    )


def check_disjoint(pool: Sequence[Example], probe: Sequence[Example]) -> None:
    """InputError when the probe set shares an example (id or text) with the pool.

    The probe set trains the probes that score the pool: an overlap lets ψ_dom / ψ_div score
    examples they were fitted on (METHOD.md §2.2: a separate, disjoint probe set).
    """
    pool_ids = {ex.id for ex in pool}
    shared_ids = [ex.id for ex in probe if ex.id in pool_ids]
    if shared_ids:
        raise InputError(
            f"the probe set overlaps the pool: {len(shared_ids)} example ids are in both "
            f"(first: {shared_ids[0]!r}); the probe set must be disjoint from the pool",
            field="daar.probe",
        )
    pool_texts = {cen.example_text(ex): ex.id for ex in pool}
    shared = [(ex.id, pool_texts[t]) for ex in probe if (t := cen.example_text(ex)) in pool_texts]
    if shared:
        raise InputError(
            f"the probe set overlaps the pool: {len(shared)} probe examples have the same text as "
            f"a pool example (first: probe {shared[0][0]!r} = pool {shared[0][1]!r}); the probe "
            "set must be disjoint from the pool",
            field="daar.probe",
        )


def embedder(cfg: DaarConfig, model_cfg, params, tokenizer, mesh) -> cen.Embedder:
    """The centroid-space and probe-feature embeddings of texts, as the config defines them."""
    return cen.Embedder(
        model_cfg,
        params,
        tokenizer,
        mesh,
        cfg.max_len,
        cfg.embed_batch_size,
        cfg.centroid_source,
        cfg.centroid_layer,
        cfg.feature_layer,
        cfg.feature_norm,
    )


def run_daar(
    daar_cfg: DaarConfig | Any,
    model_cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    pool_examples: Sequence[Example],
    probe_examples: Sequence[Example],
    workdir: str | os.PathLike,
    generator: gen.Generator | None = None,
    mesh: Mesh | None = None,
) -> DaarResult:
    """Runs (or resumes) DaaR and returns the selection; `daar_cfg` may be the raw cfg.daar."""
    cfg = daar_cfg if isinstance(daar_cfg, DaarConfig) else DaarConfig.from_config(daar_cfg)
    if not 1 <= cfg.feature_layer <= model_cfg.num_layers:
        raise InputError(
            f"feature_layer={cfg.feature_layer} but the model has {model_cfg.num_layers} layers",
            field="daar.feature_layer",
        )
    if not pool_examples:
        raise InputError("the DaaR pool is empty", field="daar.pool")
    check_disjoint(pool_examples, probe_examples)
    workdir = os.fspath(workdir)
    _check_workdir(workdir, cfg, pool_examples, probe_examples)
    path = lambda name: os.path.join(workdir, name)
    emb = embedder(cfg, model_cfg, params, tokenizer, mesh)
    names, k = cfg.domain_names, len(cfg.domains)
    run: list[str] = []

    km.check_enough_rows(len(probe_examples), k)  # fail before spending the generation budget

    # 1. Model-aware synthetic pairs per domain.
    if not os.path.exists(path("generation.json")):
        generator = generator or gen.ModelGenerator(model_cfg, params, tokenizer)
        domains = [dataclasses.asdict(d) for d in cfg.domains]
        pairs, _, stats = gen.generate_all_domains(
            generator, emb.centroid_space, domains, **cfg.generation_kwargs()
        )
        as_json = {d: [{"instruction": i, "response": r} for i, r in ps] for d, ps in pairs.items()}
        stats_json = {d: s.to_dict() for d, s in stats.items()}
        _save_json(path("generation.json"), {"pairs": as_json, "stats": stats_json})
        run.append("generate")
    generated = _load_json(path("generation.json"))

    # 2. Centroids: mean centroid-space embedding of each domain's accepted pairs.
    if not os.path.exists(path("centroids.npz")):
        per_domain = [
            emb.centroid_space(
                [cen.pair_text(p["instruction"], p["response"]) for p in generated["pairs"][d]]
            )
            for d in names
        ]
        _save_npz(path("centroids.npz"), centroids_kd=cen.domain_centroids(per_domain))
        run.append("centroids")
    centroids_kd = np.load(path("centroids.npz"))["centroids_kd"]

    # 3. Pseudo-labels: k-means on the probe set, initialized at the centroids.
    if not os.path.exists(path("pseudo_labels.npz")):
        probe_emb_nd = emb.centroid_space([cen.example_text(ex) for ex in probe_examples])
        res = km.kmeans(
            probe_emb_nd,
            centroids_kd,
            metric=cfg.kmeans_metric,
            max_iters=cfg.kmeans_max_iters,
            mesh=mesh,
        )
        info = dict(iterations=res.iterations, converged=res.converged, inertia=res.inertia)
        _save_npz(
            path("pseudo_labels.npz"),
            labels_n=res.labels_n,
            centers_kd=res.centers_kd,
            info=np.array(json.dumps(info)),
        )
        run.append("pseudo_labels")
    pseudo = np.load(path("pseudo_labels.npz"))
    probe_labels_n = pseudo["labels_n"]

    # 4. ψ_dom on the pseudo-labels, then ψ_div on ψ_dom's entropy.
    if not os.path.exists(path("probe_stats.json")):
        probe_feat_nd = emb.features(probe_examples)
        common = probe_kwargs(cfg) | dict(mesh=mesh)
        dom, dom_stats = pr.train_probe(
            probe_feat_nd, probe_labels_n, kind="classify", out=k, **common
        )
        stats = dict(domain=dom_stats.to_dict())
        if cfg.probe_cross_fit_folds:
            # ψ_div's targets: ψ_dom's entropy on examples it was not trained on (METHOD.md §2.4
            # computes H with the trained ψ_dom; in-sample H is over-confident, see probes.py).
            seed = common.pop("seed")
            logits_nk, stats["cross_fit"] = pr.cross_fit_logits(
                probe_feat_nd,
                probe_labels_n,
                folds=min(cfg.probe_cross_fit_folds, len(probe_examples)),
                out=k,
                seed=seed,
                **common,
            )
            common["seed"] = seed
        else:
            logits_nk = pr.predict(dom, probe_feat_nd)
        entropy_n = pr.entropy(logits_nk)
        stats["in_sample_mean_entropy"] = float(np.mean(pr.entropy(pr.predict(dom, probe_feat_nd))))
        div, div_stats = pr.train_probe(probe_feat_nd, entropy_n, kind="regress", out=1, **common)
        stats["diversity"] = div_stats.to_dict()
        _save_npz(path("probe_domain.npz"), **pr.probe_to_arrays(dom))
        _save_npz(path("probe_diversity.npz"), **pr.probe_to_arrays(div))
        _save_json(path("probe_stats.json"), stats | {"kmeans": json.loads(str(pseudo["info"]))})
        run.append("probes")
    probe_stats = _load_json(path("probe_stats.json"))

    # 5. Score the pool.
    if not os.path.exists(path("scores.npz")):
        dom = pr.probe_from_arrays(dict(np.load(path("probe_domain.npz"))))
        div = pr.probe_from_arrays(dict(np.load(path("probe_diversity.npz"))))
        pool_feat_nd = emb.features(pool_examples)
        logits_nk = pr.predict(dom, pool_feat_nd)
        _save_npz(
            path("scores.npz"),
            scores_n=pr.predict(div, pool_feat_nd)[:, 0],
            entropy_n=pr.entropy(logits_nk),
            labels_n=logits_nk.argmax(-1).astype(np.int32),
        )
        run.append("scores")
    scores = np.load(path("scores.npz"))
    scores_n, labels_n = scores["scores_n"], scores["labels_n"]

    # 6. Select and write the manifest + records.
    sel_dir = path("selection")
    manifest_path = os.path.join(sel_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        selected_n, method, fractions = sel.choose(
            scores_n,
            labels_n,
            names,
            method=cfg.select_method,
            fraction=cfg.select_fraction,
            customized_target=cfg.customized_target,
            customized_fractions=cfg.customized_fractions,
        )
        sel.write_selection(
            sel_dir,
            pool_examples,
            selected_n,
            scores_n,
            labels_n,
            names,
            method=method,
            fractions=fractions,
            seed=cfg.seed,
        )
        run.append("select")
    manifest = _load_json(manifest_path)
    index_of = {ex.id: i for i, ex in enumerate(pool_examples)}
    selected_n = np.array([index_of[s["id"]] for s in manifest["selected"]], np.int64)

    return DaarResult(
        domain_names=names,
        centroids_kd=centroids_kd,
        generation_stats=generated["stats"],
        probe_labels_n=probe_labels_n,
        probe_stats=probe_stats,
        pool_scores_n=scores_n,
        pool_entropy_n=scores["entropy_n"],
        pool_labels_n=labels_n,
        selected_n=selected_n,
        manifest_path=manifest_path,
        selected_path=os.path.join(sel_dir, "selected.jsonl"),
        stages_run=run,
    )


def pseudo_domains(
    daar_cfg: DaarConfig | Any,
    model_cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    examples: Sequence[Example],
    workdir: str | os.PathLike,
    mesh: Mesh | None = None,
) -> list[str]:
    """The pseudo-domain name (argmax ψ_dom) of each example, from a finished `run_daar` workdir."""
    cfg = daar_cfg if isinstance(daar_cfg, DaarConfig) else DaarConfig.from_config(daar_cfg)
    probe_path = os.path.join(os.fspath(workdir), "probe_domain.npz")
    if not os.path.exists(probe_path):
        raise InputError("no trained domain probe: run run_daar first", path=probe_path)
    dom = pr.probe_from_arrays(dict(np.load(probe_path)))
    feats_nd = embedder(cfg, model_cfg, params, tokenizer, mesh).features(examples)
    return [cfg.domain_names[int(k)] for k in pr.predict(dom, feats_nd).argmax(-1)]


def relabel(examples: Sequence[Example], domains: Sequence[str]) -> dict[str, list[Example]]:
    """Groups examples by pseudo-domain (their domain field replaced), e.g. as IDEAL's domains."""
    grouped: dict[str, list[Example]] = {}
    for ex, d in zip(examples, domains, strict=True):
        grouped.setdefault(d, []).append(dataclasses.replace(ex, domain=d))
    return grouped
