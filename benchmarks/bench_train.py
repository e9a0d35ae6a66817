"""Training-step throughput (tokens/s) and MFU of ideal_jax.train.step on the current devices,
for each fine-tuning type on the same model and batch (train.finetuning: full | freeze | lora).

    python benchmarks/bench_train.py --preset small --batch 8 --seq_len 256 --dtype float32
    python benchmarks/bench_train.py --preset smollm2_135m --batch 8 --seq_len 256 \
        --finetuning full,freeze,lora --freeze_layers 4 --lora_rank 8
    python benchmarks/bench_train.py --preset 1b --mesh 1,-1,1 --batch 16 --seq_len 2048 \
        --dtype bfloat16 --remat          # one GPU node / TPU slice: FSDP over every device

freeze is timed twice: `freeze` with the frozen layers' output cached per example (the step runs
the top N layers only; `prefix_s_per_batch` is the one-off cost of computing the cache for a batch
of new examples, paid once per example over all epochs, rounds and methods: `first_epoch_tokens_
per_s` includes it) and `freeze_nocache` (the step runs the frozen layers forward, no backward).
One line of figures per type, then the last line: one JSON object with every result.

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
from ideal_jax.data import batching  # noqa: E402
from ideal_jax.model.config import ModelConfig, preset  # noqa: E402
from ideal_jax.train import finetuning as finetuning_lib  # noqa: E402
from ideal_jax.train.prefix_cache import PrefixCache  # noqa: E402
from ideal_jax.train.state import init_train_state, make_optimizer  # noqa: E402
from ideal_jax.train.step import PREFIX_HIDDEN, make_train_step  # noqa: E402

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): throughput does not depend on the
# weights, so no checkpoint is needed.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

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


def synthetic_batch(
    rows: int, seq_len: int, vocab: int, seed: int = 0, response_fraction: float = 0.5
) -> dict[str, np.ndarray]:
    """Full rows (one example each, no padding); the last `response_fraction` of each row is the
    response (the tokens that carry loss)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (rows, seq_len + 1)).astype(np.int32)
    weights = np.zeros((rows, seq_len), np.float32)
    weights[:, seq_len - int(round(response_fraction * seq_len)) :] = 1.0
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": weights,
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy(),
        "domain_ids": rng.integers(0, 4, (rows, seq_len)).astype(np.int32),
    }


def model_config(args) -> ModelConfig:
    if args.preset == "smollm2_135m":
        return ModelConfig(**SMOLLM2_135M, dtype=args.dtype, remat=args.remat)
    return preset(args.preset, args.vocab).replace(dtype=args.dtype, remat=args.remat)


def time_one(kind: str, args, model_cfg: ModelConfig, mesh, host_batch) -> dict:
    """Compile, warm up and time `args.steps` updates of fine-tuning type `kind` (a suffix
    "@all_rows": the loss and the output head at every row instead of the loss rows only)."""
    kind, _, rows_mode = kind.partition("@")
    head_rows = "all" if rows_mode == "all_rows" else "loss"
    if head_rows == "loss":  # what training does (train/loop.py): K from the examples
        k = int(np.ceil(args.response_fraction * args.seq_len))
        k = min(args.seq_len, max(8, -(-k // 8) * 8))
        if k < args.seq_len:
            host_batch = batching.add_loss_positions(host_batch, k)
    train_cfg = common.base_config().train  # the optimizer settings every config starts from
    train_cfg.finetuning = "freeze" if kind.startswith("freeze") else kind
    train_cfg.freeze_trainable_layers = args.freeze_layers
    train_cfg.lora_rank, train_cfg.lora_targets = args.lora_rank, args.lora_targets
    spec = finetuning_lib.from_config(train_cfg, model_cfg.num_layers)
    optimizer = make_optimizer(train_cfg, total_steps=1000)
    state, shardings = init_train_state(
        model_cfg, optimizer, mesh, jax.random.key(0), finetuning=spec
    )
    step_fn = make_train_step(
        model_cfg,
        optimizer,
        shardings,
        mesh,
        num_domains=4,
        grad_accum=args.grad_accum,
        finetuning=spec,
    )
    prefix_s = 0.0
    if kind == "freeze":  # the cache's one-off cost for a batch of examples it has not seen
        cache = PrefixCache(
            model_cfg,
            state.params,
            spec.first_trained_layer,
            args.seq_len,
            mesh,
            rows=args.batch,
            memory_bytes=1 << 34,
        )
        cache.hidden(
            synthetic_batch(
                args.batch, args.seq_len, model_cfg.vocab_size, 1, args.response_fraction
            )
        )
        t0 = time.perf_counter()  # compiled now: time a second batch of new examples
        host_batch = {**host_batch, PREFIX_HIDDEN: cache.hidden(host_batch)}
        prefix_s = time.perf_counter() - t0
    batch = sharding.shard_batch(host_batch, mesh)

    t0 = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = lowered.cost_analysis() or {}  # XLA's FLOP count of the step (what it skips, too)
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics if args.warmup else state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / args.steps
    tokens = args.batch * args.seq_len
    trainable = sum(np.size(x) for x in jax.tree.leaves(spec.trainable(state.params)))
    return {
        "finetuning": kind + ("@all_rows" if head_rows == "all" else ""),
        "head_rows": head_rows,
        "loss_rows_k": int(host_batch[batching.LOSS_POSITIONS].shape[1])
        if batching.LOSS_POSITIONS in host_batch
        else args.seq_len,
        **{k: v for k, v in spec.to_json().items() if k != "finetuning"},
        "trainable_params": int(trainable),
        "compile_s": round(compile_s, 2),
        "step_gflop": cost.get("flops", float("nan")) / 1e9,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "prefix_s_per_batch": prefix_s,
        "first_epoch_tokens_per_s": tokens / (step_s + prefix_s),
        "temp_bytes_per_device": getattr(memory, "temp_size_in_bytes", None),
        "final_loss": float(metrics["loss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--preset", default="tiny", help="tiny | small | 1b | llama3_8b | smollm2_135m"
    )
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
    parser.add_argument(
        "--finetuning",
        default="full",
        help="comma-separated: full, freeze, freeze_nocache, lora (same model and batch)",
    )
    parser.add_argument("--freeze_layers", type=int, default=2, help="freeze: top N layers train")
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--lora_targets", default="all")
    parser.add_argument(
        "--response_fraction",
        type=float,
        default=0.5,
        help="the share of each row that carries loss (the head runs at those rows only)",
    )
    parser.add_argument(
        "--all_rows_too",
        action="store_true",
        help="time every type also with the loss and head at all rows (the old step)",
    )
    args = parser.parse_args()

    model_cfg = model_config(args)
    mesh = sharding.make_mesh([int(s) for s in args.mesh.split(",")])
    host_batch = synthetic_batch(
        args.batch, args.seq_len, model_cfg.vocab_size, 0, args.response_fraction
    )
    kinds = [k.strip() for k in args.finetuning.split(",") if k.strip()]
    if "freeze" in kinds and "freeze_nocache" not in kinds:
        kinds.insert(kinds.index("freeze") + 1, "freeze_nocache")
    if args.all_rows_too:
        kinds = [k for kind in kinds for k in (kind, f"{kind}@all_rows")]
    devices = mesh.devices.size
    peak = peak_flops_per_device(jax.devices()[0], args.peak_flops)
    flops_per_token = model_cfg.flops_per_token(args.seq_len)
    runs = []
    for kind in kinds:
        run = time_one(kind, args, model_cfg, mesh, host_batch)
        # MFU counts full fine-tuning's FLOPs per token: for freeze / LoRA it is the speed-up's
        # equivalent in full-training FLOPs, not the FLOPs done.
        run["full_equivalent_mfu"] = (
            flops_per_token * run["tokens_per_s"] / (peak * devices) if peak else None
        )
        runs.append(run)
        print(
            f"{kind:15s} {run['tokens_per_s']:10.1f} tokens/s  step {run['step_s']:.3f} s  "
            f"first epoch {run['first_epoch_tokens_per_s']:10.1f} tokens/s  "
            f"trainable {run['trainable_params']:,}  {run['step_gflop']:.1f} GFLOP/step  "
            f"compile {run['compile_s']} s",
            flush=True,
        )
    full = next((r for r in runs if r["finetuning"] == "full"), None)
    result = {
        "preset": args.preset,
        "params": model_cfg.num_params(),
        "num_layers": model_cfg.num_layers,
        "device": jax.devices()[0].device_kind,
        "devices": devices,
        "mesh": dict(mesh.shape),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "grad_accum": args.grad_accum,
        "response_fraction": args.response_fraction,
        "peak_flops_per_device": peak if peak else "unknown (pass --peak_flops)",
        "runs": runs,
        "speedup_vs_full": (
            {r["finetuning"]: r["tokens_per_s"] / full["tokens_per_s"] for r in runs}
            if full
            else None
        ),
    }
    if len(runs) == 1:  # the single-type output of earlier versions, kept for scripts
        result.update({k: v for k, v in runs[0].items() if k != "finetuning"})
        result["tokens_per_s_per_device"] = runs[0]["tokens_per_s"] / devices
        result["mfu"] = runs[0]["full_equivalent_mfu"] if runs[0]["finetuning"] == "full" else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
