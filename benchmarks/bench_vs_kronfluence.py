"""ideal_jax vs Kronfluence (PyTorch): EK-FAC per-example scores on the same HF Llama and tokens.

    PYTHONPATH=. python benchmarks/bench_vs_kronfluence.py [--train 256 --query 8 --seq 64]
    PYTHONPATH=. python benchmarks/bench_vs_kronfluence.py --sizes default,large,long

One process: a random Hugging Face Llama (MLP layers tracked) is saved as safetensors and read by
both libraries; random token sequences (every token counts) are the training and query sets.
Both run EK-FAC with the same Fisher estimator (default empirical, deterministic; --estimator fisher
samples targets on each side with its own generator), damping 0.1 × mean eigenvalue per layer,
and pairwise scores train × query; each side runs twice (first call with compilation / warm-up,
then steady state). Kronfluence's side runs through ideal_jax.influence.kronfluence_ref on the
same rows; ideal_jax's scores are converted to Kronfluence's units (summed losses, H of the summed
loss per example, positive = helpful) with analysis_io.to_kronfluence_scores
(docs/influence_conventions.md), and parity is the Pearson correlation of the scores.
Kronfluence is an optional benchmark-only dependency: without it the script says so and exits 0.
Install it without its CUDA torch:  pip install --no-deps kronfluence einops einconv
The last line is one JSON object with the timings, their ratios and the parity.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from configs import common as common_config  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.curvature import operators  # noqa: E402
from ideal_jax.curvature import problem as problem_lib  # noqa: E402
from ideal_jax.influence import (  # noqa: E402
    analysis_io,  # noqa: E402
    gradients,
    kronfluence_ref,  # noqa: E402
    per_example,
)
from ideal_jax.influence import stage as influence_stage  # noqa: E402
from ideal_jax.model import hf_io  # noqa: E402

MLP = ("gate_proj", "up_proj", "down_proj")


def make_checkpoint(path: str, args) -> None:
    import torch  # the optional torch side, imported once main() knows it is installed
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq * 2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)


def run_kronfluence(path, train, query, args) -> tuple[dict, np.ndarray]:
    """Kronfluence on the same rows as ideal_jax (tokens[:-1] → tokens[1:], every token counts):
    ideal_jax.influence.kronfluence_ref, two calls (warm-up, steady state)."""
    modules = [f"model.layers.{i}.mlp.{m}" for i in range(args.layers) for m in MLP]
    out, scores, _ = kronfluence_ref.pairwise_scores(
        path,
        kronfluence_ref.dataset([_batch(train)]),
        kronfluence_ref.dataset([_batch(query)]),
        modules,
        damping_factor=None,  # None: 0.1 × mean eigenvalue
        sample_targets=args.estimator == "fisher",
        train_batch_size=args.batch,
        query_batch_size=args.query,
        threads=args.threads,
        calls=2,
    )
    return out, scores  # scores [Q, N]


def _batch(tokens_nt: np.ndarray, group: int = 0) -> dict:
    n, t = tokens_nt.shape
    return {
        "tokens": jnp.asarray(tokens_nt[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens_nt[:, 1:], jnp.int32),
        "weights": jnp.ones((n, t - 1), jnp.float32),
        "segment_ids": jnp.ones((n, t - 1), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (n, t - 1)),
        "domain_ids": jnp.full((n, t - 1), group, jnp.int32),
    }


def run_ideal_jax(path, train, query, args) -> tuple[dict, np.ndarray]:
    model_cfg = hf_io.load_hf_config(path)
    params = hf_io.load_hf_params(path, model_cfg)
    layers = layers_lib.select_layers(params, "mlp")
    problem = problem_lib.lm_problem(model_cfg, layers)
    train_batches = [_batch(train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    # the influence stage's own factor fit (factors, then the EK-FAC correction: from the factor
    # pass's kept captures when they fit in keep_captures_gib, else a second pass)
    curv = ml_collections.ConfigDict(
        dict(
            estimator=args.estimator,
            correction="per_example",
            keep_captures_gib=args.keep_captures_gib,
        )
    )
    out, scores = {}, None
    for call in (1, 2):
        t0 = time.perf_counter()
        rng = jax.random.key(call)
        timings = {"factors": 0.0, "eigen_correction": 0.0}
        curvature, state = influence_stage.fit_curvature(
            curv, "ekfac", problem, params, lambda: train_batches, rng, timings
        )
        jax.block_until_ready(state.correction)
        t1 = time.perf_counter()
        op = operators.build_operator(
            "ekfac",
            problem=problem,
            params=params,
            curvature=curvature,
            state=state,
            damping=0.1,
            relative_damping=True,
        )
        qgrads = gradients.single_group_mean_gradients(
            problem,
            params,
            [(q, _batch(query[q : q + 1], q)) for q in range(len(query))],
            [f"q{q}" for q in range(len(query))],
        )
        vs = op.many([qgrads.row(q) for q in range(len(query))])
        scores = per_example.per_example_scores(problem, params, train_batches, vs)
        t2 = time.perf_counter()
        out[call] = {
            "factors_s": t1 - t0,
            "scores_s": t2 - t1,
            "total_s": t2 - t0,
            "factor_passes_s": {k: round(v, 3) for k, v in timings.items()},
        }
    w_n = np.full(len(train), train.shape[1] - 1.0)  # every token after the first counts
    w_q = np.full(len(query), query.shape[1] - 1.0)
    return out, analysis_io.to_kronfluence_scores(scores, w_n, w_q)  # [Q, N], their units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--query", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--keep-captures-gib",
        type=float,
        default=float(common_config.base_config().curvature.keep_captures_gib),
        help="curvature.keep_captures_gib (default: the product's): captures the factor pass "
        "keeps for the EK-FAC fit; 0 = a second model pass",
    )
    parser.add_argument(
        "--estimator",
        default="empirical",
        choices=("empirical", "fisher"),
        help="empirical: deterministic on both sides (parity); fisher: sampled targets",
    )
    parser.add_argument(
        "--sizes",
        default="",
        help="comma-separated presets run one after another (" + ", ".join(SIZES) + "); each "
        "prints one JSON line and the last line holds them all (overrides the size flags)",
    )
    args = parser.parse_args()
    if not kronfluence_ref.available():  # optional dependency
        print("kronfluence not available (needs torch and kronfluence); skipping")
        print(json.dumps({"skipped": "kronfluence not installed"}))
        return
    if not args.sizes:
        print(json.dumps(compare(args)))
        return
    results = []
    for name in args.sizes.split(","):
        preset = argparse.Namespace(**{**vars(args), **SIZES[name.strip()]})
        results.append({"size": name.strip(), **compare(preset)})
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"sizes": results}))


# The sizes issue 28 asks for: the default, a wider and deeper model on longer rows, and long
# sequences (the score pass's cost grows with T·I·O per example; Kronfluence's the same).
SIZES = {
    "default": dict(train=256, query=8, seq=64, hidden=128, layers=2, batch=32),
    "large": dict(train=512, query=16, seq=128, hidden=256, layers=4, batch=32),
    "long": dict(train=128, query=8, seq=512, hidden=128, layers=2, batch=8),
}


def compare(args) -> dict:
    """Both libraries on one size: parity and timings (one JSON-able dict)."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, args.vocab, (args.train, args.seq)).astype(np.int64)
    query = rng.integers(0, args.vocab, (args.query, args.seq)).astype(np.int64)
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint(path, args)
        ours, s_ours = run_ideal_jax(path, train, query, args)
        theirs, s_theirs = run_kronfluence(path, train, query, args)
    pearson = float(np.corrcoef(s_ours.ravel(), s_theirs.ravel())[0, 1])
    per_query = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(s_ours, s_theirs)]
    result = {
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "train": args.train,
        "query": args.query,
        "seq": args.seq,
        "estimator": args.estimator,
        "pearson": round(pearson, 5),
        "pearson_min_per_query": round(min(per_query), 5),
        "keep_captures_gib": args.keep_captures_gib,
        "ideal_jax": {
            c: {k: v if isinstance(v, dict) else round(v, 3) for k, v in ours[c].items()}
            for c in (1, 2)
        },
        "kronfluence": {c: {k: round(v, 3) for k, v in theirs[c].items()} for c in (1, 2)},
        # > 1: ideal_jax is faster (Kronfluence time / ideal_jax time)
        "speedup_steady": {k: round(theirs[2][k] / ours[2][k], 3) for k in theirs[2]},
        "speedup_first_call": {k: round(theirs[1][k] / ours[1][k], 3) for k in theirs[1]},
        "device": f"{jax.device_count()} {jax.default_backend()}; torch {args.threads} threads",
    }
    print(f"parity: Pearson {pearson:.5f} (min per query {min(per_query):.5f})")
    for c, label in ((1, "first call"), (2, "steady state")):
        print(f"{label}: ideal_jax {ours[c]}  kronfluence {theirs[c]}")
    result["load_average_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine
    return result


if __name__ == "__main__":
    main()
