"""Cost of IDEAL's influence stage relative to SFT, measured on the demo suite and projected.

    PYTHONPATH=. python benchmarks/bench_influence.py --config tiny [--operator ekfac]
        [--sigma 0.5] [--epochs 1]

Measures, for one model and one mixture (D_0 of the demo suite):
  * SFT (stages.train_round, from the base model): XLA compile time and step time, separately
    (run_sft's summary), plus the wall time of the whole call (data, checkpoints);
  * the influence stage (stages.influence_round): its sub-stage timings and the wall time of two
    identical calls, with the compile time inside each (JAX compile events). influence_round jits
    new closures on every call, so the second call would recompile; a persistent XLA cache makes
    it skip backend compilation, which brackets the steady-state cost;
  * K-FAC factor memory per selected layer and in total (layers.factor_bytes);
and projects factor memory and the influence / SFT FLOP ratio to Llama-3.1-8B (MLP gate/up/down,
32 layers). Every time printed is measured; only the lines marked "model" are arithmetic.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ideal_jax import sharding, stages  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.data import batching  # noqa: E402
from ideal_jax.data import mixture as mixture_lib  # noqa: E402
from ideal_jax.influence import stage as influence_stage  # noqa: E402
from ideal_jax.model.config import preset  # noqa: E402

GIB = 2**30
COMPILE_EVENTS = (  # tracing, lowering to MLIR and XLA compilation: everything before running
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


class CompileClock:
    """Collects (end time, seconds) of every JAX compile event, to split wall time by stage.

    Trace events of nested jits can overlap, so the sum is an upper bound of compile time.
    """

    def __init__(self):
        self.events: list[tuple[float, float]] = []
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self.events.append((time.perf_counter(), float(duration)))

    def between(self, start: float, end: float) -> float:
        return sum(d for t, d in self.events if start <= t <= end)


def use_persistent_cache(path: str) -> None:
    """XLA executables cached by HLO hash: the 2nd influence call skips backend compilation even
    though influence_round builds new jitted closures (which defeats jit's in-memory cache)."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def stage_compile(clock: CompileClock, end: float, timings: dict[str, float]) -> dict:
    """Compile seconds inside each sub-stage of an influence call that ended at `end`.

    influence_round times its sub-stages back to back and returns right after the last, so the
    windows are recovered backwards from the end of the call.
    """
    out = {}
    for name, seconds in reversed(list(timings.items())):
        out[name] = clock.between(end - seconds, end)
        end -= seconds
    return dict(reversed(list(out.items())))


def make_config(name: str, operator: str | None, sigma: float | None, epochs: int):
    """configs/NAME.py with the benchmark's overrides (no progress bars, one round)."""
    cfg = importlib.import_module(f"configs.{name}").get_config()
    with cfg.unlocked():
        cfg.progress = False
        cfg.train.epochs = epochs
        if operator:
            cfg.influence.operator = operator
        if sigma is not None:
            cfg.curvature.sigma = sigma
    return cfg


def padded_positions(items, batch_size: int, seq_len: int, mode: str) -> int:
    """Token positions (padding included) that one pass over `items` computes on."""
    return batching.steps_per_epoch(items, batch_size, seq_len, mode) * batch_size * seq_len


def layer_shapes(params, layers) -> dict[str, tuple[int, int]]:
    shapes = layers_lib.linear_layer_paths(params)
    return {path: shapes[path] for path in layers}


def influence_flops(model_cfg, shapes, *, positions, examples, ref_positions, caps):
    """FLOP model of one influence stage (EK-FAC, per-example correction); see `main`'s notes.

    positions / examples: of the σ-subsample; ref_positions: of the reference set.
    """
    per_token = model_cfg.flops_per_token(1)  # 6·P, fwd + bwd (attention term negligible here)
    out = {}
    # Factor pass: one fwd + bwd plus the outer products x xᵀ and δ δᵀ of every token.
    outer = sum(2 * (a * a + b * b) for a, b in shapes.values())
    out["factors"] = positions * (per_token + outer)
    # Correction pass: fwd + bwd, per-example gradients Σ_t x_t δ_tᵀ and their projection
    # Q_Aᵀ g Q_G (what ekfac._project_squared does per example).
    per_example = sum(2 * (a * a * b + a * b * b) for a, b in shapes.values())
    grad_outer = sum(2 * a * b for a, b in shapes.values())
    out["eigen_correction"] = positions * (per_token + grad_outer) + examples * per_example
    # Group gradients: batches hold one group each, one forward + backward per batch.
    out["gradients"] = (positions + ref_positions) * per_token
    # Eigendecompositions (~9 d³ each) and one inverse product per reference row.
    eigh = sum(9 * (a**3 + b**3) for a, b in shapes.values())
    out["eigh_and_inverse"] = eigh + (1 + caps) * per_example
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("tiny", "demo"), default="tiny")
    parser.add_argument("--operator", default=None, help="identity|kfac|ekfac (config default)")
    parser.add_argument("--sigma", type=float, default=None, help="σ (config default 0.5)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args()
    cfg = make_config(args.config, args.operator, args.sigma, args.epochs)
    clock = CompileClock()

    with tempfile.TemporaryDirectory() as workdir:
        use_persistent_cache(os.path.join(workdir, "xla_cache"))
        mesh = sharding.make_mesh(dict(cfg.mesh))
        suite = stages.load_suite(cfg, workdir)
        model_cfg, base = stages.load_model(cfg, mesh, suite.tokenizer)
        ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
        mix = mixture_lib.build_mixture(ids, None, seed=cfg.seed)
        rdir = os.path.join(workdir, "round_0")
        t0 = time.perf_counter()
        params = stages.train_round(cfg, model_cfg, mesh, rdir, suite, mix, base)
        sft_wall = time.perf_counter() - t0
        with open(os.path.join(rdir, "train", "summary.json")) as f:
            sft = json.load(f)
        calls = []
        for _ in range(2):  # the same call twice; the second reuses cached XLA executables
            t0 = time.perf_counter()
            out = stages.influence_round(cfg, model_cfg, params, suite, mix, mesh)
            end = time.perf_counter()
            compile_s = stage_compile(clock, end, out["timings"])
            calls.append((end - t0, clock.between(t0, end), out["timings"], compile_s))

    epoch_s = sft["train_seconds"] / args.epochs
    items = mixture_lib.materialize(mix, suite.tokenized)
    sub = influence_stage.sigma_subsample(suite, mix, cfg.curvature.sigma, cfg.seed)
    print(
        f"== {args.config}: {model_cfg.num_params():,} params, {len(items)} training examples, "
        f"σ={cfg.curvature.sigma} subsample {len(sub)}, operator {cfg.influence.operator}, "
        f"SFT epochs {args.epochs}, {jax.device_count()} {jax.default_backend()} device(s)"
    )
    print(
        f"SFT        wall {sft_wall:7.2f} s = compile {sft['compile_seconds']:.2f} s + steps "
        f"{sft['train_seconds']:.2f} s ({sft['total_steps']} steps, {epoch_s:.2f} s/epoch) "
        "+ data and checkpoints"
    )
    for k, (wall, comp, timings, stage_comp) in enumerate(calls):
        parts = ", ".join(f"{n} {t:.2f} (compile {stage_comp[n]:.2f})" for n, t in timings.items())
        print(f"influence {k + 1}: wall {wall:7.2f} s, compile {comp:.2f} s; {parts}")
    steady_hi, steady_lo = calls[1][0], calls[1][0] - calls[1][1]
    print(
        f"influence steady state between {steady_lo:.2f} s (call 2 − its compile events) and "
        f"{steady_hi:.2f} s (call 2, XLA cache hit; still re-traces); ratio to one SFT epoch "
        f"(steps only) {steady_lo / epoch_s:.2f}–{steady_hi / epoch_s:.2f}; first-call walls "
        f"ratio {calls[0][0] / (sft_wall / args.epochs):.2f}"
    )

    layers = layers_lib.select_layers(params, cfg.curvature.layers)
    shapes = layer_shapes(params, layers)
    per_layer = {p: layers_lib.factor_bytes(a, b) for p, (a, b) in shapes.items()}
    correction = sum(4 * a * b for a, b in shapes.values())  # EK-FAC: one eigenvalue per weight
    print("factor memory per layer (A, G and their eigenbases, f32):")
    for path, nbytes in per_layer.items():
        print(f"  {path:<26} {str(shapes[path]):>11} {nbytes / 2**10:9.1f} KiB")
    total = sum(per_layer.values())
    print(f"  total {total / 2**20:.3f} MiB, + EK-FAC correction {correction / 2**20:.3f} MiB")

    # FLOP model of the measured problem (influence_round: one example per row, rows of seq_len).
    seq_len = out["seq_len"]
    pos = padded_positions(sub, cfg.curvature.batch_size, seq_len, "pad")
    ref_pos = padded_positions(suite.reference_tokenized, cfg.influence.batch_size, seq_len, "pad")
    flops = influence_flops(
        model_cfg,
        shapes,
        positions=pos,
        examples=len(sub),
        ref_positions=ref_pos,
        caps=len(suite.capabilities),
    )
    sft_pos = sft["total_steps"] * cfg.train.batch_size * cfg.train.seq_len
    sft_flops = sft_pos * model_cfg.flops_per_token(1)
    print(
        f"model: influence/SFT({args.epochs} ep) FLOPs {sum(flops.values()) / sft_flops:.2f} = "
        + " + ".join(f"{k} {v / sft_flops:.2f}" for k, v in flops.items())
        + f" (influence passes {pos} padded positions, SFT epoch {sft_pos // args.epochs} packed)"
    )
    project_llama()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sft": sft, "sft_wall": sft_wall, "influence": calls}, fh, default=float)


def project_llama(seq_len: int = 1024, sigma: float = 0.5, domains: int = 4) -> None:
    """Factor memory and influence/SFT FLOPs for Llama-3.1-8B with the MLP layers selected."""
    big = preset("llama3_8b", 128256)
    d, f = big.hidden_size, big.intermediate_size
    shapes = {}
    for i in range(big.num_layers):  # gate, up: D → F; down: F → D
        shapes.update({f"{i}.gate": (d, f), f"{i}.up": (d, f), f"{i}.down": (f, d)})
    total = sum(layers_lib.factor_bytes(a, b) for a, b in shapes.values())
    shared = total - big.num_layers * layers_lib.factor_bytes(d, 0)  # gate/up share x
    corr = sum(4 * a * b for a, b in shapes.values())
    print(
        f"model: Llama-3.1-8B MLP factors {total / GIB:.1f} GiB ({total / big.num_layers / GIB:.2f}"
        f" GiB per decoder layer; {shared / GIB:.1f} GiB if gate/up shared their input factor), "
        f"+ EK-FAC correction {corr / GIB:.1f} GiB"
    )
    n = 1000.0  # examples; everything below is per example, so n cancels
    for epochs in (1, 3):
        fl = influence_flops(
            big,
            shapes,
            positions=sigma * n * seq_len,
            examples=sigma * n,
            ref_positions=0.0,
            caps=domains,
        )
        fl.pop("eigh_and_inverse")  # fixed cost, < 1 % at N ~ 10^5 examples
        sft = epochs * n * seq_len * big.flops_per_token(seq_len)
        print(
            f"model: Llama-3.1-8B T={seq_len} σ={sigma} {domains} domains, SFT {epochs} epoch(s): "
            f"influence/SFT FLOPs {sum(fl.values()) / sft:.2f} = "
            + " + ".join(f"{k} {v / sft:.2f}" for k, v in fl.items())
        )


if __name__ == "__main__":
    main()
