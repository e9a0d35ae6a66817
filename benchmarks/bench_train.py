"""Training-step throughput (tokens/s) and MFU of ideal_jax.train.step on the current devices.

    python benchmarks/bench_train.py --preset small --batch 8 --seq_len 256 --dtype float32
    python benchmarks/bench_train.py --preset 1b --mesh 1,-1,1 --batch 16 --seq_len 2048 \
        --dtype bfloat16 --remat          # one GPU node / TPU slice: FSDP over every device

MFU = ModelConfig.flops_per_token(seq_len) x tokens/s / (peak FLOP/s per device x devices). Peak
FLOP/s come from a table of dense bf16 figures by device kind (or --peak_flops); on CPU, or for an
unknown device, MFU is reported only when --peak_flops is given. Compile time is measured
separately (AOT lower + compile) and excluded from the step timings, as are --warmup steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from ideal_jax import sharding  # noqa: E402
from ideal_jax.model.config import preset
from ideal_jax.train.state import init_train_state, make_optimizer
from ideal_jax.train.step import make_train_step

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity). Matched as substrings of
# jax.Device.device_kind, first match wins (so "v5p" and "v5 lite" precede plain "v5").
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
)


def peak_flops_per_device(device: jax.Device, override: float | None) -> float | None:
    if override:
        return override
    for name, flops in PEAK_FLOPS:
        if name.lower() in device.device_kind.lower():
            return flops
    return None


def synthetic_batch(rows: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Full rows (one example each, no padding); the second half of each row is the response."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
    weights = np.zeros((rows, seq_len), np.float32)
    weights[:, seq_len // 2 :] = 1.0
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": weights,
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "domain_ids": rng.integers(0, 4, (rows, seq_len)).astype(np.int32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="tiny | small | 1b | llama3_8b")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor (one may be -1)")
    parser.add_argument("--batch", type=int, default=8, help="global rows per step")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--peak_flops", type=float, default=None, help="per device, FLOP/s")
    args = parser.parse_args()

    model_cfg = preset(args.preset, args.vocab).replace(dtype=args.dtype, remat=args.remat)
    mesh = sharding.make_mesh([int(s) for s in args.mesh.split(",")])
    train_cfg = common.base_config().train  # the optimizer settings every config starts from
    optimizer = make_optimizer(train_cfg, total_steps=1000)
    state, shardings = init_train_state(model_cfg, optimizer, mesh, jax.random.key(0))
    step_fn = make_train_step(
        model_cfg, optimizer, shardings, mesh, num_domains=4, grad_accum=args.grad_accum
    )
    batch = sharding.shard_batch(synthetic_batch(args.batch, args.seq_len, args.vocab), mesh)

    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics if args.warmup else state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / args.steps

    tokens_per_s = args.batch * args.seq_len / step_s
    flops_per_token = model_cfg.flops_per_token(args.seq_len)
    achieved = flops_per_token * tokens_per_s
    devices = mesh.devices.size
    peak = peak_flops_per_device(jax.devices()[0], args.peak_flops)
    result = {
        "preset": args.preset,
        "params": model_cfg.num_params(),
        "device": jax.devices()[0].device_kind,
        "devices": devices,
        "mesh": dict(mesh.shape),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "grad_accum": args.grad_accum,
        "compile_s": round(compile_s, 2),
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / devices,
        "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / (peak * devices) if peak else None,
        "peak_flops_per_device": peak if peak else "unknown (pass --peak_flops)",
        "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
        "final_loss": float(metrics["loss"]),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
