"""DaaR end to end (METHOD.md §2): generate → centroids → pseudo-labels → probes → scores → select.

`run_daar` runs the stages in order. Each stage's output goes through the package's one artifact
cache (ideal_jax/artifacts.py `cached`): written atomically, recorded in the workdir's
provenance.json with the fingerprints of what produced it, and on a rerun reused only if those
match: the DaarConfig fields the stage reads (config.STAGE_FIELDS), the pool and probe examples
(ids and texts), the caller's `inputs` (mode=daar: the model and data config sections,
provenance.stage_inputs) and the content of the upstream artifacts. An interrupted run resumes
where it stopped; a changed input or a hand-edited artifact is an InputError naming it, nothing is
overwritten; a new selection variant reuses the finished stages before it.

Workdir layout:
  generation.json        "generate": accepted pairs and per-domain generation stats
  centroids.npz          "centroids": centroids_kd
  pseudo_labels.npz      "pseudo_labels": probe-set k-means labels, centres, convergence info
  probe_domain.npz, probe_diversity.npz, probe_stats.json    "probes"
  scores.npz             "scores": ψ_div score, ψ_dom entropy and argmax per pool example
  selection/manifest.json, selection/selected.jsonl          "select"
  provenance.json (selection/provenance.json), timings.json (wall time per stage)

Config: `DaarConfig.from_section(cfg.daar)` (ideal_jax/daar/config.py; the fields and their defaults
are configs/common.py's cfg.daar).

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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ideal_jax import artifacts, provenance
from ideal_jax.daar import centroids as cen
from ideal_jax.daar import generation as gen
from ideal_jax.daar import kmeans as km
from ideal_jax.daar import probes as pr
from ideal_jax.daar import selection as sel
from ideal_jax.daar import store
from ideal_jax.daar.config import STAGE_FIELDS, DaarConfig
from ideal_jax.data.records import Example
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import Params
from ideal_jax.utils.errors import InputError

STAGES = tuple(STAGE_FIELDS)


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


def _as_config(daar_cfg: DaarConfig | Any) -> DaarConfig:
    return daar_cfg if isinstance(daar_cfg, DaarConfig) else DaarConfig.from_section(daar_cfg)


def examples_fingerprint(pool: Sequence[Example], probe: Sequence[Example]) -> str:
    """SHA-256 over the id and text of every pool and probe example."""
    h = hashlib.sha256()
    for tag, examples in (("pool", pool), ("probe", probe)):
        h.update(f"\0{tag} {len(examples)}\0".encode())
        for ex in examples:
            h.update(f"{ex.id}\0{cen.example_text(ex)}\0".encode())
    return h.hexdigest()[:16]


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
    inputs: Mapping[str, str] | None = None,
) -> DaarResult:
    """Runs (or resumes) DaaR and returns the selection; `daar_cfg` may be the raw cfg.daar.

    inputs: fingerprints of what the artifacts depend on besides cfg.daar and the examples (the
    model, its tokenizer, the generator); job.run_inputs gives them for a config's run.
    """
    cfg = _as_config(daar_cfg)
    _check_inputs(cfg, model_cfg, pool_examples, probe_examples)
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    context = {"data": examples_fingerprint(pool_examples, probe_examples), **(inputs or {})}
    stages = _Stages(cfg, workdir, embedder(cfg, model_cfg, params, tokenizer, mesh), context, mesh)
    km.check_enough_rows(len(probe_examples), len(cfg.domains))  # before the generation budget
    generated = stages.generate(
        lambda: generator or gen.ModelGenerator(model_cfg, params, tokenizer)
    )
    centroids_kd = stages.centroids(generated)
    pseudo = stages.pseudo_labels(probe_examples, centroids_kd)
    probe_stats = stages.probes(probe_examples, pseudo)
    pool_scores = stages.scores(pool_examples)
    manifest = stages.select(pool_examples, pool_scores)
    index_of = {ex.id: i for i, ex in enumerate(pool_examples)}
    selected_n = np.array([index_of[s["id"]] for s in manifest["selected"]], np.int64)
    return DaarResult(
        domain_names=cfg.domain_names,
        centroids_kd=centroids_kd,
        generation_stats=generated["stats"],
        probe_labels_n=pseudo["labels_n"],
        probe_stats=probe_stats,
        pool_scores_n=pool_scores["scores_n"],
        pool_entropy_n=pool_scores["entropy_n"],
        pool_labels_n=pool_scores["labels_n"],
        selected_n=selected_n,
        manifest_path=stages.manifest_path,
        selected_path=os.path.join(stages.selection_dir, "selected.jsonl"),
        stages_run=stages.run,
    )


def _check_inputs(
    cfg: DaarConfig,
    model_cfg: ModelConfig,
    pool_examples: Sequence[Example],
    probe_examples: Sequence[Example],
) -> None:
    if not 1 <= cfg.feature_layer <= model_cfg.num_layers:
        raise InputError(
            f"feature_layer={cfg.feature_layer} but the model has {model_cfg.num_layers} layers",
            field="daar.feature_layer",
        )
    if not pool_examples:
        raise InputError("the DaaR pool is empty", field="daar.pool")
    check_disjoint(pool_examples, probe_examples)


_NPZ = dict(load=store.load_npz, save=store.save_npz)


class _Stages:
    """DaaR's stages in WORKDIR, each one `artifacts.cached` call keyed by its own inputs: the
    DaarConfig fields it reads, the examples, the caller's inputs and its upstream artifacts."""

    def __init__(self, cfg: DaarConfig, workdir: str, emb, context: dict, mesh):
        self.cfg, self.workdir, self.emb, self.context, self.mesh = cfg, workdir, emb, context, mesh
        self.timer = artifacts.Timer(self.path("timings.json"))
        self.run: list[str] = []  # the stages computed in this call
        self.probe_files = {
            "domain": self.path("probe_domain.npz"),
            "diversity": self.path("probe_diversity.npz"),
        }
        self.selection_dir = self.path("selection")
        self.manifest_path = os.path.join(self.selection_dir, "manifest.json")

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def inputs(self, stage: str, *upstream: str) -> dict[str, str]:
        own = {**self.context, "config.daar": self.cfg.fingerprint(stage)}
        return provenance.with_upstream(own, **{os.path.basename(p): p for p in upstream})

    def cached(self, stage: str, file: str, compute, inputs: Mapping[str, str], **load_save):
        def computed():
            self.run.append(stage)
            return compute()

        return artifacts.cached(
            file, computed, inputs=inputs, timer=self.timer, name=stage, **load_save
        )

    def generate(self, make_writer) -> dict:
        """1. Model-aware synthetic pairs per domain → generation.json."""
        cfg, emb = self.cfg, self.emb

        def generate():
            domains = [dataclasses.asdict(d) for d in cfg.domains]
            pairs, _, stats = gen.generate_all_domains(
                make_writer(), emb.centroid_space, domains, **cfg.generation_kwargs()
            )
            as_json = {
                d: [{"instruction": i, "response": r} for i, r in ps] for d, ps in pairs.items()
            }
            return {"pairs": as_json, "stats": {d: s.to_dict() for d, s in stats.items()}}

        return self.cached(
            "generate", self.path("generation.json"), generate, self.inputs("generate")
        )

    def centroids(self, generated: dict) -> np.ndarray:
        """2. The mean centroid-space embedding of each domain's accepted pairs → centroids_kd."""

        def centroids():
            per_domain = [
                self.emb.centroid_space(
                    [cen.pair_text(p["instruction"], p["response"]) for p in generated["pairs"][d]]
                )
                for d in self.cfg.domain_names
            ]
            return {"centroids_kd": cen.domain_centroids(per_domain)}

        inputs = self.inputs("centroids", self.path("generation.json"))
        out = self.cached("centroids", self.path("centroids.npz"), centroids, inputs, **_NPZ)
        return out["centroids_kd"]

    def pseudo_labels(self, probe_examples: Sequence[Example], centroids_kd: np.ndarray) -> dict:
        """3. k-means on the probe set, initialized at the centroids → pseudo_labels.npz."""
        cfg = self.cfg

        def pseudo_labels():
            probe_emb_nd = self.emb.centroid_space([cen.example_text(ex) for ex in probe_examples])
            res = km.kmeans(
                probe_emb_nd,
                centroids_kd,
                metric=cfg.kmeans_metric,
                max_iters=cfg.kmeans_max_iters,
                mesh=self.mesh,
            )
            info = dict(iterations=res.iterations, converged=res.converged, inertia=res.inertia)
            return dict(
                labels_n=res.labels_n, centers_kd=res.centers_kd, info=np.array(json.dumps(info))
            )

        inputs = self.inputs("pseudo_labels", self.path("centroids.npz"))
        return self.cached(
            "pseudo_labels", self.path("pseudo_labels.npz"), pseudo_labels, inputs, **_NPZ
        )

    def probes(self, probe_examples: Sequence[Example], pseudo: dict) -> dict:
        """4. ψ_dom on the pseudo-labels, then ψ_div on ψ_dom's entropy. probe_stats.json is the
        stage's artifact; the two probes' .npz files are written (and recorded) before it."""
        cfg, probe_files = self.cfg, self.probe_files
        probe_inputs = self.inputs("probes", self.path("pseudo_labels.npz"))
        k, probe_labels_n = len(cfg.domains), pseudo["labels_n"]

        def probes():
            probe_feat_nd = self.emb.features(probe_examples)
            common = cfg.probe_kwargs() | dict(mesh=self.mesh)
            dom, dom_stats = pr.train_probe(
                probe_feat_nd, probe_labels_n, kind="classify", out=k, **common
            )
            stats = dict(domain=dom_stats.to_dict())
            if cfg.probe_cross_fit_folds:
                # ψ_div's targets: ψ_dom's entropy on examples it was not trained on (METHOD.md
                # §2.4 computes H with the trained ψ_dom; in-sample H is over-confident, see
                # probes.py).
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
            in_sample_n = pr.entropy(pr.predict(dom, probe_feat_nd))
            stats["in_sample_mean_entropy"] = float(np.mean(in_sample_n))
            div, div_stats = pr.train_probe(
                probe_feat_nd, entropy_n, kind="regress", out=1, **common
            )
            stats["diversity"] = div_stats.to_dict()
            stats["kmeans"] = json.loads(str(pseudo["info"]))
            return {
                "stats": stats,
                "domain": pr.probe_to_arrays(dom),
                "diversity": pr.probe_to_arrays(div),
            }

        def save_probes(stats_path: str, out: dict) -> None:
            for key, file in probe_files.items():
                store.save_npz(file, out[key])
                provenance.record(file, probe_inputs)
            artifacts.write_json(stats_path, out["stats"])

        def load_probes(stats_path: str) -> dict:
            for file in probe_files.values():
                provenance.check(file, probe_inputs)
            return {"stats": artifacts.read_json(stats_path)}

        return self.cached(
            "probes",
            self.path("probe_stats.json"),
            probes,
            probe_inputs,
            load=load_probes,
            save=save_probes,
        )["stats"]

    def scores(self, pool_examples: Sequence[Example]) -> dict:
        """5. Every pool example's ψ_div score, ψ_dom entropy and argmax → scores.npz."""

        def scores():
            dom = pr.probe_from_arrays(store.load_npz(self.probe_files["domain"]))
            div = pr.probe_from_arrays(store.load_npz(self.probe_files["diversity"]))
            pool_feat_nd = self.emb.features(pool_examples)
            logits_nk = pr.predict(dom, pool_feat_nd)
            return dict(
                scores_n=pr.predict(div, pool_feat_nd)[:, 0],
                entropy_n=pr.entropy(logits_nk),
                labels_n=logits_nk.argmax(-1).astype(np.int32),
            )

        inputs = self.inputs("scores", *self.probe_files.values())
        return self.cached("scores", self.path("scores.npz"), scores, inputs, **_NPZ)

    def select(self, pool_examples: Sequence[Example], pool_scores: dict) -> dict:
        """6. The selection: its manifest (the stage's artifact) and the selected records."""
        cfg, names = self.cfg, self.cfg.domain_names
        scores_n, labels_n = pool_scores["scores_n"], pool_scores["labels_n"]

        def select():
            selected_n, method, fractions = sel.choose(
                scores_n,
                labels_n,
                names,
                method=cfg.select_method,
                fraction=cfg.select_fraction,
                customized_target=cfg.customized_target,
                customized_fractions=cfg.customized_fractions,
            )
            return sel.manifest_of(
                pool_examples,
                selected_n,
                scores_n,
                labels_n,
                names,
                method=method,
                fractions=fractions,
                seed=cfg.seed,
            )

        return self.cached(
            "select",
            self.manifest_path,
            select,
            self.inputs("select", self.path("scores.npz")),
            save=lambda _, m: sel.write_selection_files(self.selection_dir, pool_examples, m),
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
    cfg = _as_config(daar_cfg)
    probe_path = os.path.join(os.fspath(workdir), "probe_domain.npz")
    if not os.path.exists(probe_path):
        raise InputError("no trained domain probe: run run_daar first", path=probe_path)
    dom = pr.probe_from_arrays(store.load_npz(probe_path))
    feats_nd = embedder(cfg, model_cfg, params, tokenizer, mesh).features(examples)
    return [cfg.domain_names[int(k)] for k in pr.predict(dom, feats_nd).argmax(-1)]


def relabel(examples: Sequence[Example], domains: Sequence[str]) -> dict[str, list[Example]]:
    """Groups examples by pseudo-domain (their domain field replaced), e.g. as IDEAL's domains."""
    grouped: dict[str, list[Example]] = {}
    for ex, d in zip(examples, domains, strict=True):
        grouped.setdefault(d, []).append(dataclasses.replace(ex, domain=d))
    return grouped
