"""Throughput of batched KV-cache generation (ideal_jax.model.decoding), greedy and sampling.

    PYTHONPATH=. python benchmarks/bench_generation.py --preset tiny [--batch_size 64]
        [--prompt_len 128] [--new_tokens 128] [--dtype float32|bfloat16]
        [--param_dtype float32|bfloat16] [--modes greedy,sample] [--temperature 0.8]
        [--top_p 0.95] [--repeats 5] [--json OUT]

Random parameters of a model preset (tiny | small | 1b | llama3_8b; ideal_jax.model.config),
random prompts of exactly `prompt_len` tokens, and no EOS, so every row generates exactly
`new_tokens` tokens. For each mode it prints, measured separately:

  compile   lowering + XLA compilation of `decoding.generate_tokens` for this shape (AOT)
  1st call  the first call through the jitted function after that (cache fill, allocation)
  prefill   one call with max_new_tokens=1 (the prompt forward pass and the first token)
  total     one call generating `new_tokens` tokens: median (and min) over `repeats` runs
  new tok/s batch_size × new_tokens / total
  decode    batch_size × (new_tokens − 1) / (total − prefill): steady-state tokens/s of the loop

and, for greedy, the wall time of `decoding.generate` (token lists in and out, including host-side
left-padding and the device→host copy) at the same shapes. Every number is measured on the default
JAX backend (the GPU when there is one; set JAX_PLATFORMS=cpu to force the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ideal_jax.model import decoding  # noqa: E402
from ideal_jax.model.config import preset  # noqa: E402
from ideal_jax.model.transformer import init_params  # noqa: E402

# tiny: about the demo suite's 103-token tokenizer; the others: a Llama-2 / TinyLlama vocabulary.
DEFAULT_VOCAB = {"tiny": 128, "small": 32000, "1b": 32000, "llama3_8b": 128256}


def _block(x):
    return jax.block_until_ready(x)


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return times


def bench_mode(
    cfg, params, prompt_bp, mask_bp, *, new_tokens: int, mode: str, repeats: int, sampling: dict
):
    """Compile, prefill and generation times of generate_tokens for one sampling mode."""
    sampling = sampling if mode == "sample" else dict(temperature=0.0, top_p=1.0)
    rng = jax.random.key(1)

    def call(n: int):
        return decoding.generate_tokens(
            cfg, params, prompt_bp, mask_bp, rng, max_new_tokens=n, eos_id=-1, pad_id=0, **sampling
        )

    def compile_time(n: int) -> float:
        start = time.perf_counter()
        decoding.generate_tokens.lower(
            cfg, params, prompt_bp, mask_bp, rng, max_new_tokens=n, eos_id=-1, pad_id=0, **sampling
        ).compile()
        return time.perf_counter() - start

    compile_s = compile_time(new_tokens)
    compile_time(1)
    # Timed through the jitted function itself (its dispatch is part of the cost): the first
    # calls fill jit's cache (compiling again if the AOT compilation above was not shared).
    start = time.perf_counter()
    out = _block(call(new_tokens))
    first_s = time.perf_counter() - start
    assert out.shape == (prompt_bp.shape[0], new_tokens), out.shape
    _block(call(1))
    prefill_s = statistics.median(_timed(lambda: call(1), repeats))
    times = _timed(lambda: call(new_tokens), repeats)
    total_s = statistics.median(times)
    b = prompt_bp.shape[0]
    decode_s = max(total_s - prefill_s, 1e-9)
    return {
        "mode": mode,
        **sampling,
        "compile_s": compile_s,
        "first_call_s": first_s,
        "prefill_s": prefill_s,
        "total_s": total_s,
        "total_min_s": min(times),
        "new_tokens_per_s": b * new_tokens / total_s,
        "decode_tokens_per_s": b * (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "ms_per_decode_step": 1e3 * decode_s / max(new_tokens - 1, 1),
    }


def bench_generate_api(cfg, params, prompt_bp, *, new_tokens: int, repeats: int) -> dict:
    """decoding.generate (lists in and out, greedy) at the same shapes: host overhead included."""
    prompts = prompt_bp.tolist()
    run = lambda: decoding.generate(cfg, params, prompts, max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = run()  # compiles generate_tokens through jit's cache (bucketed shapes)
    first_s = time.perf_counter() - start
    assert len(out) == len(prompts) and all(len(row) == new_tokens for row in out)
    times = _timed(run, repeats)
    total_s = statistics.median(times)
    return {
        "mode": "generate() greedy",
        "first_call_s": first_s,
        "total_s": total_s,
        "new_tokens_per_s": len(prompts) * new_tokens / total_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULT_VOCAB))
    parser.add_argument("--vocab_size", type=int, default=None, help="default: per preset")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--param_dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="storage of the parameters (matmuls always run in --dtype)",
    )
    parser.add_argument("--modes", default="greedy,sample", help="comma-separated: greedy,sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="mode sample")
    parser.add_argument(
        "--top_p", type=float, default=0.95, help="mode sample; 1.0 skips the nucleus sort"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_generate_api", action="store_true", help="skip decoding.generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("greedy", "sample") for m in modes):
        parser.error(f"--modes must be a subset of greedy,sample, got {args.modes!r}")
    if "sample" in modes and args.temperature <= 0:
        parser.error("--temperature must be > 0 for mode sample (0 is greedy)")

    vocab = args.vocab_size or DEFAULT_VOCAB[args.preset]
    cfg = preset(args.preset, vocab_size=vocab).replace(dtype=args.dtype)
    if args.prompt_len + args.new_tokens > cfg.max_position_embeddings:
        print(
            f"note: prompt_len + new_tokens = {args.prompt_len + args.new_tokens} exceeds "
            f"max_position_embeddings = {cfg.max_position_embeddings}"
        )
    device = jax.devices()[0]
    print(
        f"backend {jax.default_backend()} ({device.device_kind}, {jax.device_count()} device(s); "
        f"runs on one) | jax {jax.__version__}"
    )
    start = time.perf_counter()
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(args.seed))
    if args.param_dtype != "float32":
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(args.param_dtype)), params)
    _block(params)
    n_params = cfg.num_params()
    print(
        f"preset {args.preset}: {n_params / 1e6:,.2f}M parameters (vocab {vocab}), "
        f"compute {args.dtype}, params {args.param_dtype}; init {time.perf_counter() - start:.1f} s"
    )
    print(
        f"batch {args.batch_size}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
        f"KV cache {args.prompt_len + args.new_tokens} positions, median of {args.repeats}"
    )

    rng = np.random.default_rng(args.seed)
    prompt_np = rng.integers(1, vocab, (args.batch_size, args.prompt_len), dtype=np.int32)
    prompt_bp = jax.device_put(prompt_np)
    mask_bp = jax.device_put(np.ones_like(prompt_np, dtype=bool))
    results = []
    header = (
        f"{'mode':<20} {'compile s':>10} {'1st call s':>10} {'prefill ms':>11} {'total ms':>10} "
        f"{'new tok/s':>12} {'decode tok/s':>13} {'ms/step':>8}"
    )
    print(header)
    for mode in modes:
        r = bench_mode(
            cfg,
            params,
            prompt_bp,
            mask_bp,
            new_tokens=args.new_tokens,
            mode=mode,
            repeats=args.repeats,
            sampling=dict(temperature=args.temperature, top_p=args.top_p),
        )
        results.append(r)
        label = mode if mode == "greedy" else f"sample T={args.temperature} p={args.top_p}"
        decode = f"{r['decode_tokens_per_s']:13,.0f}" if r["decode_tokens_per_s"] else f"{'-':>13}"
        print(
            f"{label:<20} {r['compile_s']:10.2f} {r['first_call_s']:10.2f} "
            f"{r['prefill_s'] * 1e3:11.1f} "
            f"{r['total_s'] * 1e3:10.1f} {r['new_tokens_per_s']:12,.0f} {decode} "
            f"{r['ms_per_decode_step']:8.2f}"
        )
    if not args.no_generate_api and "greedy" in modes:
        r = bench_generate_api(
            cfg, params, prompt_np, new_tokens=args.new_tokens, repeats=args.repeats
        )
        results.append(r)
        print(
            f"{r['mode']:<20} {'':>10} {r['first_call_s']:10.2f} {'':>11} "
            f"{r['total_s'] * 1e3:10.1f} {r['new_tokens_per_s']:12,.0f}"
        )
    # Decoding reads every parameter once per step: 2·P FLOPs per generated token (attention aside).
    best = max(r["new_tokens_per_s"] for r in results)
    print(f"model: ~{2 * n_params * best / 1e12:.3f} TFLOP/s in matmuls at the best new tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "backend": jax.default_backend(),
                    "device_kind": device.device_kind,
                    "num_params": n_params,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
