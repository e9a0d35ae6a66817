"""Where the K-FAC factors' eigendecompositions are fastest: kfac-jax's jitted cache update vs
LAPACK on the host (curvature/kfac.py `_host_cache`, the path taken when the factors live on CPU).

    PYTHONPATH=. python benchmarks/bench_eigh.py [--hidden 256 --layers 4 --repeats 5]

One process: a random Hugging Face Llama's MLP layers (gate/up/down, as bench_vs_kronfluence)
get K-FAC factors from a few random batches; then both ways of filling the eigen cache run
`--repeats` times, interleaved (so a busy machine slows both alike), and the best time of each is
reported, with the largest eigenvalue difference and the relative difference of one K-FAC inverse
product between the two. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def _host_cache_float32(curvature, state):
    """The host path with LAPACK in float32 (ssyevd) instead of float64 — for comparison."""
    from ideal_jax.curvature import kfac as kfac_lib

    original = kfac_lib.host_eigh

    def eigh32(a):
        s, q = np.linalg.eigh(np.asarray(a, np.float32))
        return np.clip(s, 0.0, None), q

    kfac_lib.host_eigh = eigh32
    try:
        return curvature._host_cache(state)
    finally:
        kfac_lib.host_eigh = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from ideal_jax.curvature import kfac as kfac_lib
    from ideal_jax.curvature import layers as layers_lib
    from ideal_jax.curvature import problem as problem_lib
    from ideal_jax.model.config import ModelConfig
    from ideal_jax.model.transformer import init_params

    model_cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=4,
        head_dim=args.hidden // 4,
        max_position_embeddings=2 * args.seq,
    )
    params = init_params(model_cfg, jax.random.key(0))
    layers = layers_lib.select_layers(params, "mlp")
    problem = problem_lib.lm_problem(model_cfg, layers)
    curvature = kfac_lib.curvature_for(problem, "empirical")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tokens = rng.integers(0, args.vocab, (16, args.seq + 1))
        n, t = tokens[:, :-1].shape
        batches.append(
            {
                "tokens": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32),
                "weights": np.ones((n, t), np.float32),
                "segment_ids": np.ones((n, t), np.int32),
                "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
            }
        )
    state = curvature.init(params, batches[0], jax.random.key(1))
    for i, b in enumerate(batches):
        state = curvature.update(state, params, b, jax.random.key(i))
    state = curvature._real_token_bias(state)
    sizes = sorted({int(f.value.shape[0]) for b in state.kfac.blocks_states for f in b.factors})
    ways = {
        "device": curvature._cache,
        "host": curvature._host_cache,  # float64 LAPACK (the product's host path)
        "host_float32": lambda st: _host_cache_float32(curvature, st),
    }
    best = {k: float("inf") for k in ways}
    out = {}
    jax.block_until_ready(curvature._cache(state))  # compile the jitted way once
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            out[name] = jax.block_until_ready(fn(state))
            best[name] = min(best[name], time.perf_counter() - t0)
    ev = {k: curvature.eigenbases(v) for k, v in out.items()}
    max_ev_diff = max(
        float(np.max(np.abs(np.asarray(a[i]) - np.asarray(b[i]))) / max(float(np.max(a[i])), 1e-30))
        for a, b in zip(ev["device"].values(), ev["host"].values())
        for i in (1, 3)
    )
    selected, _ = layers_lib.split_params(params, layers)
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype), selected)
    damping = {p: 1e-3 for p in curvature.block_paths()}
    x = {k: curvature.multiply_inverse(out[k], v, damping) for k in ways}
    num = sum(
        float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
        for a, b in zip(jax.tree.leaves(x["device"]), jax.tree.leaves(x["host"]))
    )
    den = sum(float(np.sum(np.asarray(a) ** 2)) for a in jax.tree.leaves(x["device"]))
    result = {
        "host_float32_s": round(best["host_float32"], 3),
        "factor_sizes": sizes,
        "blocks": len(state.kfac.blocks_states),
        "device_s": round(best["device"], 3),
        "host_s": round(best["host"], 3),
        "speedup": round(best["device"] / best["host"], 2),
        "max_rel_eigenvalue_diff": max_ev_diff,
        "inverse_product_rel_diff": (num / den) ** 0.5,
        "backend": jax.default_backend(),
        "repeats": args.repeats,
    }
    print(
        f"eigen cache: kfac-jax jitted {best['device']:.3f} s, host LAPACK float64 "
        f"{best['host']:.3f} s, float32 {best['host_float32']:.3f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
