"""DaaR against random and k-center selection on a pool where DaaR's premise holds, over seeds.

    python benchmarks/daar_selection.py --seeds 5 --workdir /tmp/daar_selection

The pool (ideal_jax/daar/demo_pools.py `build_premise_pool`, 3,000 examples): 85% is two redundant
clusters (reverse, uppercase: 40 distinct items each, copied), the other three capabilities the
evaluation needs (arithmetic, sort, lookup) are 5% each; the test split scores all five with equal
weight. Labels are hidden from every selector. For each seed, four selections of the same size
(20% of the pool) are each used to fine-tune the same random-init tiny model with the same
training seed and budget, then scored by exact match on the test split:

  daar_top         DaaR as the paper: the top 20% of the pool by ψ_div
  daar_per_domain  DaaR's score, top 20% within each pseudo-domain (trimmed to the same size)
  random           a uniform random 20%
  kcenter          farthest-point (k-center greedy) sampling on the same probe features f(x)
  daar_top_dedup   a diagnostic, not the paper: DaaR's top 20% after dropping exact duplicates
                   (copies of one text share one ψ_div score, so the top fraction takes them all)

DaaR runs with configs/daar_demo.py's cfg.daar (the library defaults plus feature_layer=2 for the
2-layer model); the centroid pairs come from a scripted "perfect instruct model" that writes fresh
items of each described capability. Paired 95% t intervals over seeds (ideal_jax.stats);
every seed's scores are cached under --workdir, so a rerun resumes. The last line printed is one
JSON object: method -> {"mean", "ci95"} of the average exact match. About 20 minutes on a shared
2-core CPU; the results and their diagnosis are in docs/method_choices.md (DaaR).

    python benchmarks/daar_selection.py --measure --seeds 3

instead measures what the DaaR defaults rest on (docs/method_choices.md, DaaR): k-means purity per
metric and embedding space, and ψ_dom accuracy per feature layer / final norm / training setting, on
the overlapping charset pool (`demo_pools.charset_pool`) with the tiny random-init model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import daar_demo  # noqa: E402
from ideal_jax import (  # noqa: E402
    sharding,
    stats,  # noqa: E402
    summary,
)
from ideal_jax.daar import centroids as cen  # noqa: E402
from ideal_jax.daar import demo_pools, job, pipeline  # noqa: E402
from ideal_jax.daar import selection as sel  # noqa: E402
from ideal_jax.daar.config import DaarConfig  # noqa: E402
from ideal_jax.data import demo_suite, mixture  # noqa: E402
from ideal_jax.data import suite as suite_lib  # noqa: E402
from ideal_jax.evaluate import stage as evaluate_stage  # noqa: E402
from ideal_jax.model import loading  # noqa: E402
from ideal_jax.train import stage as train_stage  # noqa: E402

METHODS = ("daar_top", "daar_per_domain", "random", "kcenter", "daar_top_dedup")


def equal_size(picked_n: np.ndarray, scores_n: np.ndarray, count: int) -> np.ndarray:
    """`picked_n` trimmed (lowest scores out) or topped up (best unpicked in) to `count`."""
    picked_n = np.asarray(picked_n, np.int64)
    if len(picked_n) > count:
        keep = np.lexsort((picked_n, -scores_n[picked_n]))[:count]
        return picked_n[np.sort(keep)]
    rest = np.setdiff1d(np.arange(len(scores_n)), picked_n)
    extra = rest[np.lexsort((rest, -scores_n[rest]))[: count - len(picked_n)]]
    return np.concatenate([picked_n, extra])


def selections(cfg, seed: int, workdir: str, suite, model_cfg, params, mesh, pp):
    """{method: pool indices} and DaaR's probe stats for one seed."""
    daar_cfg = DaarConfig.from_section(cfg.daar)
    pairs = {
        cap: demo_suite.generate_items(cap, 30, 10_000 + seed) for cap in daar_demo.DESCRIPTIONS
    }
    generator = job.FilePairsGenerator("", dict(cfg.daar.domains), pairs)
    pool = pp.hidden(pp.pool)
    result = pipeline.run_daar(
        daar_cfg,
        model_cfg,
        params,
        suite.tokenizer,
        pool,
        pp.hidden(pp.probe),
        os.path.join(workdir, "daar"),
        generator,
        mesh,
    )
    count = len(result.selected_n)
    scores_n = result.pool_scores_n
    per_domain = sel.select_per_domain(scores_n, result.pool_labels_n, daar_cfg.select_fraction)
    emb = pipeline.embedder(daar_cfg, model_cfg, params, suite.tokenizer, mesh)
    features_nd = emb.features(pool)
    first_copy = {}  # text -> the first pool index holding it
    for i, ex in enumerate(pool):
        first_copy.setdefault(cen.example_text(ex), i)
    distinct_n = np.array(sorted(first_copy.values()))
    # Top by score among distinct texts; topped up with the best copies if there are too few.
    dedup = distinct_n[sel.select_top_fraction(scores_n[distinct_n], 1.0)[:count]]
    dedup = equal_size(dedup, scores_n, count)
    picks = {
        "daar_top": result.selected_n,
        "daar_top_dedup": dedup,
        "daar_per_domain": equal_size(per_domain, scores_n, count),
        "random": np.random.default_rng(seed).choice(len(pool), count, replace=False),
        "kcenter": sel.select_farthest_point(features_nd, count, seed),
    }
    names = result.domain_names  # cfg.daar.domains order (a ConfigDict: sorted by name)
    true_n = np.array([names.index(ex.domain) for ex in pp.pool])
    info = {
        "probe_stats": result.probe_stats,
        "pool_pseudo_label_accuracy": float(np.mean(result.pool_labels_n == true_n)),
        "pool_purity": demo_pools.purity(result.pool_labels_n, true_n),
    }
    return picks, info


def train_and_score(cfg, rdir: str, suite, model_cfg, params, mesh, ids: list[str]):
    """SFT on exactly these pool ids (grouped by true domain for batching), then evaluate.

    Returns (exact match per capability and their average on the test split, response-token loss
    per capability on the reference split and their equal-weight average).
    """
    by_domain: dict[str, list[str]] = {name: [] for name in suite.domain_names}
    for example_id in ids:
        by_domain[example_id.split(":")[0]].append(example_id)
    mix = mixture.build_mixture(by_domain, None, seed=cfg.seed)
    os.makedirs(rdir, exist_ok=True)
    final = train_stage.train_round(cfg.train, cfg.data, model_cfg, mesh, rdir, suite, mix, params)
    result = evaluate_stage.evaluate_round(
        cfg.eval,
        model_cfg,
        final,
        suite,
        mesh,
        seed=cfg.seed,
        loss_batch_size=cfg.influence.batch_size,
        seq_len=cfg.train.seq_len,
    )
    losses = {c: v for c, v in result["reference_loss"].items() if c != "all"}
    losses["average"] = float(np.mean(list(losses.values())))
    return summary.round_scores({"eval": result}), losses


def _setup(args, seed: int, workdir: str):
    """The seed's premise pool (written under WORKDIR/demo_data), config, suite and base model."""
    pp = demo_pools.build_premise_pool(
        os.path.join(workdir, "demo_data"),
        seed=seed,
        n_pool=args.pool,
        n_probe=args.probe,
        n_ref=args.ref,
    )
    cfg = daar_demo.get_config()
    cfg.unlock()
    cfg.seed, cfg.daar.seed, cfg.train.seed, cfg.progress = seed, seed, seed, False
    cfg.data.demo_train_sizes = dict(pp.sizes)  # the pool written above is read, not rebuilt
    cfg.train.epochs = args.epochs
    cfg.eval.limit = 0
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, workdir)
    model_cfg, params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    return pp, cfg, mesh, suite, model_cfg, params


def describe(pp, picks: dict[str, np.ndarray]) -> dict:
    """What each selection holds by true capability: examples, and distinct texts among them."""
    out = {"composition": {}, "distinct": {}, "distinct_per_capability": {}}
    for method, picked in picks.items():
        chosen = [pp.pool[i] for i in picked]
        texts = {
            cap: {cen.example_text(ex) for ex in chosen if ex.domain == cap} for cap in pp.sizes
        }
        out["composition"][method] = {
            cap: sum(ex.domain == cap for ex in chosen) for cap in pp.sizes
        }
        out["distinct"][method] = sum(len(t) for t in texts.values())
        out["distinct_per_capability"][method] = {cap: len(t) for cap, t in texts.items()}
    return out


def run_seed(args, seed: int) -> dict:
    workdir = os.path.join(args.workdir, f"seed_{seed}")
    done = os.path.join(workdir, "scores.json")
    out = {"scores": {}, "loss": {}}
    if os.path.exists(done):  # finished methods are kept; missing ones (added later) are run
        with open(done) as f:
            out = json.load(f)
        if all(m in out["scores"] for m in METHODS) and "distinct_per_capability" in out:
            return out
    start = time.time()
    pp, cfg, mesh, suite, model_cfg, params = _setup(args, seed, workdir)
    picks, info = selections(cfg, seed, workdir, suite, model_cfg, params, mesh, pp)
    out |= describe(pp, picks) | info
    out["pool_sizes"] = dict(pp.sizes)
    for method in METHODS:
        if method in out["scores"]:
            continue
        ids = [pp.pool[i].id for i in picks[method]]
        out["scores"][method], out["loss"][method] = train_and_score(
            cfg, os.path.join(workdir, f"sft_{method}"), suite, model_cfg, params, mesh, ids
        )
        print(
            f"seed {seed} {method:>16}: average {out['scores'][method]['average']:.3f}  "
            f"loss {out['loss'][method]['average']:.3f}  "
            + json.dumps({k: round(v, 3) for k, v in out["scores"][method].items()})
            + f"  picked {out['composition'][method]}",
            flush=True,
        )
    out["seconds"] = out.get("seconds", 0.0) + round(time.time() - start, 1)
    with open(done, "w") as f:
        json.dump(out, f, indent=1)
    return out


def _table(runs, key: str, title: str) -> dict:
    """Per-capability mean ± ci95, paired Δ of the average to random; {method: mean, ci95}."""
    caps = list(runs[0][key]["random"])
    print(f"\n{title}")
    print(f"{'method':<16} " + " ".join(f"{c:>12}" for c in caps) + "   Δ average vs random")
    out = {}
    for method in METHODS:
        cells = []
        for cap in caps:
            s = stats.mean_ci([r[key][method][cap] for r in runs])
            cells.append(f"{s['mean']:.3f}±{s['ci95'] or 0:.3f}")
        avg = [r[key][method]["average"] for r in runs]
        diff = stats.paired(avg, [r[key]["random"]["average"] for r in runs])
        sig = " *" if diff["significant"] else ""
        print(
            f"{method:<16} "
            + " ".join(f"{c:>12}" for c in cells)
            + f"   {diff['mean']:+.3f}±{diff['ci95'] or 0:.3f}{sig}"
        )
        out[method] = {k: stats.mean_ci(avg)[k] for k in ("mean", "ci95")}
        out[method]["vs_random"] = {k: diff[k] for k in ("mean", "ci95", "significant")}
    return out


def compare(args) -> dict:
    runs = [run_seed(args, seed) for seed in range(args.seeds)]
    print(
        f"\n{args.seeds} seeds, {args.pool}-example pool, 20% selected, {args.epochs} epochs; "
        "mean ± 95% t interval over seeds, * = paired interval excludes 0"
    )
    scores = _table(runs, "scores", "exact match on the test split (higher is better)")
    losses = _table(runs, "loss", "response loss on the reference split (lower is better)")
    print(
        "\nmean picks per true capability: examples / distinct texts (pool: "
        + json.dumps(runs[0]["pool_sizes"])
        + ")"
    )
    for method in METHODS:
        cells = []
        for cap in runs[0]["composition"][method]:
            n = np.mean([r["composition"][method][cap] for r in runs])
            distinct = np.mean([r["distinct_per_capability"][method][cap] for r in runs])
            cells.append(f"{cap} {n:.0f}/{distinct:.0f}")
        total = np.mean([r["distinct"][method] for r in runs])
        print(f"{method:<16} " + ", ".join(cells) + f"; distinct texts {total:.0f}")
    dom = stats.mean_ci([r["probe_stats"]["domain"]["val_accuracy"] for r in runs])
    cross = stats.mean_ci([r["probe_stats"]["cross_fit"]["heldout_accuracy"] for r in runs])
    print(
        f"ψ_dom val accuracy {dom['mean']:.3f}±{dom['ci95'] or 0:.3f} (3% split), cross-fit "
        f"held-out accuracy {cross['mean']:.3f}±{cross['ci95'] or 0:.3f}; pool pseudo-label "
        f"accuracy {np.mean([r['pool_pseudo_label_accuracy'] for r in runs]):.3f}; "
        f"{np.mean([r['seconds'] for r in runs]):.0f} s per seed"
    )
    with open(os.path.join(args.workdir, "tables.json"), "w") as f:
        json.dump({"exact_match": scores, "reference_loss": losses}, f, indent=1)
    return {m: {"mean": v["mean"], "ci95": v["ci95"]} for m, v in scores.items()}


# --- --measure: the evidence behind the DaaR defaults ---

SPACES = {  # name -> (source, layer, final norm)
    "input": ("input", 0, False),
    "hidden1": ("hidden", 1, False),
    "hidden1+norm": ("hidden", 1, True),
    "hidden2": ("hidden", 2, False),
    "hidden2+norm": ("hidden", 2, True),
}
PROBE_SETTINGS = {
    "paper: 1 ep, lr 1e-5, batch 1": dict(lr=1e-5, epochs=1, batch_size=1),
    "1 ep, lr 1e-4, batch 1": dict(lr=1e-4, epochs=1, batch_size=1),
    "1 ep, lr 1e-3, batch 1": dict(lr=1e-3, epochs=1, batch_size=1),
    "20 ep, lr 1e-3, batch 32": dict(lr=1e-3, epochs=20, batch_size=32),
}


def measure_seed(seed: int, n_probe: int, n_pool: int) -> dict:
    import jax

    from ideal_jax.daar import generation
    from ideal_jax.daar import kmeans as km
    from ideal_jax.daar import probes as pr
    from ideal_jax.model.config import preset
    from ideal_jax.model.transformer import init_params

    tokenizer = demo_suite.build_tokenizer()
    model_cfg = preset("tiny", vocab_size=len(tokenizer))
    params = jax.jit(init_params, static_argnums=0)(model_cfg, jax.random.key(seed))
    probe, probe_true = demo_pools.charset_pool(n_probe, 100 + seed, "probe")
    pool, pool_true = demo_pools.charset_pool(n_pool, 200 + seed, "pool")
    probe_true, pool_true = np.array(probe_true), np.array(pool_true)
    k = len(demo_pools.CHARSETS)
    emb = cen.Embedder(model_cfg, params, tokenizer, max_len=64)
    domains = [
        dict(name=f"d{d}", description=f"texts written with the characters {c}.", tau=0.95)
        for d, c in enumerate(demo_pools.CHARSETS)
    ]
    pairs, _, _ = generation.generate_all_domains(
        generation.ScriptedGenerator(demo_pools.charset_respond),
        emb.centroid_space,
        domains,
        seed=seed,
    )
    texts = lambda examples: [cen.example_text(ex) for ex in examples]
    out = {"kmeans": {}, "probe": {}}
    for name, (source, layer, normed) in SPACES.items():
        probe_nd = emb.texts(texts(probe), source, layer, normed)
        centroids_kd = np.stack(
            [
                emb.texts([cen.pair_text(*p) for p in pairs[d["name"]]], source, layer, normed)
                for d in domains
            ]
        ).mean(axis=1)
        for metric in km.METRICS:
            labels_n = km.kmeans(probe_nd, centroids_kd, metric=metric).labels_n
            out["kmeans"][f"{name} | {metric}"] = demo_pools.purity(labels_n, probe_true)
    # ψ_dom on the paper's pseudo-labels (input embeddings, Euclidean k-means).
    centroids_kd = np.stack(
        [emb.centroid_space([cen.pair_text(*p) for p in pairs[d["name"]]]).mean(0) for d in domains]
    )
    labels_n = km.kmeans(
        emb.centroid_space(texts(probe)), centroids_kd, metric="euclidean"
    ).labels_n
    for name in ("hidden1", "hidden2", "hidden2+norm"):
        _, layer, normed = SPACES[name]
        probe_nd = emb.texts(texts(probe), "hidden", layer, normed)
        pool_nd = emb.texts(texts(pool), "hidden", layer, normed)
        for setting, kw in PROBE_SETTINGS.items():
            kw = dict(kw, val_fraction=0.03, seed=seed)
            dom, dom_stats = pr.train_probe(probe_nd, labels_n, kind="classify", out=k, **kw)
            _, cross = pr.cross_fit_logits(probe_nd, labels_n, folds=5, out=k, **kw)
            in_sample_h = float(pr.entropy(pr.predict(dom, probe_nd)).mean())
            out["probe"][f"{name} | {setting}"] = {
                "val_accuracy": dom_stats.val_accuracy,
                "cross_fit_accuracy": cross["heldout_accuracy"],
                "pool_accuracy_vs_true": float(
                    np.mean(pr.predict(dom, pool_nd).argmax(-1) == pool_true)
                ),
                "in_sample_entropy": in_sample_h,
                "held_out_entropy": cross["heldout_mean_entropy"],
            }
    return out


def measure(args) -> dict:
    runs = [measure_seed(seed, 2 * args.probe, args.probe) for seed in range(args.seeds)]
    print(f"k-means purity, charset probe set ({2 * args.probe} examples, {args.seeds} seeds)")
    table = {"kmeans": {}, "probe": {}}
    for key in runs[0]["kmeans"]:
        s = stats.mean_ci([r["kmeans"][key] for r in runs])
        table["kmeans"][key] = s
        print(f"  {key:<26} {s['mean']:.3f} ± {s['ci95'] or 0:.3f}")
    print("ψ_dom on the paper's pseudo-labels (mean over seeds)")
    for key in runs[0]["probe"]:
        row = {m: stats.mean_ci([r["probe"][key][m] for r in runs]) for m in runs[0]["probe"][key]}
        table["probe"][key] = row
        print(f"  {key:<46} " + "  ".join(f"{m} {v['mean']:.3f}" for m, v in row.items()))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/daar_selection")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--pool", type=int, default=3000)
    parser.add_argument("--probe", type=int, default=1000)
    parser.add_argument("--ref", type=int, default=50, help="reference items per capability")
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    result = measure(args) if args.measure else compare(args)
    with open(
        os.path.join(args.workdir, "measure.json" if args.measure else "result.json"), "w"
    ) as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result if not args.measure else {"measured": True}))


if __name__ == "__main__":
    main()
