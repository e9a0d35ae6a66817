"""Causal attention in query blocks (transformer.ATTENTION_BLOCK) vs one block, in one process.

    PYTHONPATH=. python benchmarks/bench_attention_blocks.py [--seq 512 --batch 8 --hidden 128]

On one random Llama-shaped model, the forward (logits), the training gradient (all parameters)
and the curvature capture (captures.layer_captures: forward + activation-only backward, MLP
layers) are each jitted twice — with the attention split into blocks of ATTENTION_BLOCK query
rows, and as one block (the full masked softmax) — and timed interleaved (medians). The two give
the same numbers (checked here too: max |Δ logits|). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ideal_jax.curvature import captures  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.curvature import problem as problem_lib  # noqa: E402
from ideal_jax.model import transformer  # noqa: E402
from ideal_jax.model.config import ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        head_dim=args.hidden // args.heads,
    )
    params = transformer.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    b, t = args.batch, args.seq
    tokens = rng.integers(0, args.vocab, (b, t + 1))
    batch = {
        "tokens": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "weights": jnp.ones((b, t), jnp.float32),
        "segment_ids": jnp.ones((b, t), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
    }
    layers = layers_lib.select_layers(params, "mlp")
    problem = problem_lib.lm_problem(cfg, layers)
    selected, rest = layers_lib.split_params(params, layers)
    cot = captures.loss_cotangent(problem, batch, problem_lib.loss_rows(problem, batch)[1])

    def loss(p):
        return problem_lib.weighted_loss_sum(problem, p, batch)[0]

    def build():  # fresh jits: the block size is read when the attention is traced
        return {
            "forward": jax.jit(lambda p: transformer.forward(cfg, p, batch["tokens"])),
            "gradient": jax.jit(jax.grad(loss)),
            "capture": jax.jit(
                lambda p: captures.layer_captures(
                    problem, layers_lib.split_params(p, layers)[0], rest, batch, cot
                )[1]
            ),
        }

    variants = {}
    outs = {}
    default = transformer.ATTENTION_BLOCK
    for name, block in (("blocks", default), ("one_block", 10**9)):
        transformer.ATTENTION_BLOCK = block
        fns = build()
        outs[name] = jax.block_until_ready({k: f(params) for k, f in fns.items()})
        variants[name] = fns
    transformer.ATTENTION_BLOCK = default
    del selected
    diff = float(jnp.max(jnp.abs(outs["blocks"]["forward"] - outs["one_block"]["forward"])))
    times = {f"{v}/{k}": [] for v in variants for k in variants[v]}
    load0 = os.getloadavg()[0]
    for _ in range(args.repeats):
        for v, fns in variants.items():
            for k, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(params))
                times[f"{v}/{k}"].append(time.perf_counter() - t0)
    med = {k: round(float(np.median(x)) * 1e3, 1) for k, x in times.items()}
    for k, ms in med.items():
        print(f"{k:22s} median {ms:8.1f} ms per batch of {b} x {t}")
    speedup = {k: round(med[f"one_block/{k}"] / med[f"blocks/{k}"], 2) for k in variants["blocks"]}
    print(f"max |Δ logits| {diff:.2e}; speed-up of blocks {speedup}")
    result = {
        "seq": t,
        "batch": b,
        "hidden": args.hidden,
        "layers": args.layers,
        "attention_block": default,
        "median_ms": med,
        "speedup": speedup,
        "max_abs_logit_diff": diff,
        "repeats": args.repeats,
        "load_average_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "device": f"{jax.device_count()} {jax.default_backend()}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
