"""Influence stage cost relative to one SFT epoch at ≥ 20,000 training examples, at the product's
defaults (the α-error subsample budget) unless told otherwise.

    PYTHONPATH=. python benchmarks/bench_influence.py                      # the defaults
    PYTHONPATH=. python benchmarks/bench_influence.py --examples-per-domain 0   # σ = 0.5
    PYTHONPATH=. python benchmarks/bench_influence.py --scales demo,large  # also 56,000 examples

For each scale (one model, one mixture; "demo" is every source of the demo suite, 28,000
examples, "large" twice that, on the same tiny model):
  * SFT (train_stage.train_round, one epoch from the base model): step time (compile excluded) and
    compile time, from run_sft's summary;
  * the influence stage (influence/stage.py influence_for_round) called twice in one process: the
    first call includes compilation, the second is the steady state (its jitted passes are built
    once per
    process); its sub-stage timings and α's standard errors relative to |α|;
  * K-FAC factor memory and a FLOP model of the stage, projected to Llama-3.1-8B (lines "model").
The last line is one JSON object {"scales": [...]}, each entry with examples, sft_epoch_s,
influence_s (steady state), ratio (= influence_s / sft_epoch_s) and the first-call figures beside.
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
import numpy as np  # noqa: E402

from ideal_jax import sharding  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.data import batching  # noqa: E402
from ideal_jax.data import mixture as mixture_lib  # noqa: E402
from ideal_jax.data import suite as suite_lib  # noqa: E402
from ideal_jax.influence import stage as influence_stage  # noqa: E402
from ideal_jax.model import loading  # noqa: E402
from ideal_jax.model.config import preset  # noqa: E402
from ideal_jax.train import stage as train_stage  # noqa: E402

demo_config = importlib.import_module("configs.demo")

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


def stage_compile(clock: CompileClock, end: float, timings: dict[str, float]) -> dict:
    """Compile seconds inside each sub-stage of an influence call that ended at `end`.

    influence_round times its sub-stages back to back and returns right after the last, so the
    windows are recovered backwards from the end of the call (an approximation: the stage also
    does untimed host work between them).
    """
    out = {}
    for name, seconds in reversed(list(timings.items())):
        out[name] = clock.between(end - seconds, end)
        end -= seconds
    return dict(reversed(list(out.items())))


# Domain sizes per scale: demo = every source of configs/demo.py (its pools, 4 x D0: 28,000
# examples); large = twice that (56,000).
SCALES = {
    "demo": None,
    "large": {k: 2 * v for k, v in demo_config.STARTING_MIXTURES["default"].items()},
}


def make_config(scale: str, args):
    """configs/demo.py with the benchmark's overrides (no progress bars, one round, one epoch)."""
    cfg = demo_config.get_config()
    with cfg.unlocked():
        cfg.progress = False
        cfg.train.epochs = 1
        if SCALES[scale] is not None:
            cfg.data.demo_train_sizes = dict(SCALES[scale])
        if args.operator:
            cfg.influence.operator = args.operator
        if args.sigma is not None:
            cfg.curvature.sigma = args.sigma
        if args.subsample is not None:
            cfg.curvature.subsample = args.subsample
        if args.examples_per_domain is not None:
            cfg.curvature.examples_per_domain = args.examples_per_domain
        if args.alpha_se_target is not None:
            cfg.curvature.alpha_se_target = args.alpha_se_target
        if args.max_examples_per_domain is not None:
            cfg.curvature.max_examples_per_domain = args.max_examples_per_domain
        if args.batch_size is not None:  # the influence passes' rows per batch (both sections)
            cfg.curvature.batch_size = cfg.influence.batch_size = args.batch_size
    return cfg


def padded_positions(items, batch_size: int, seq_len: int, mode: str) -> int:
    """Token positions (padding included) that one pass over `items` computes on."""
    return batching.steps_per_epoch(items, batch_size, seq_len, mode) * batch_size * seq_len


def layer_shapes(params, layers) -> dict[str, tuple[int, int]]:
    shapes = layers_lib.linear_layer_paths(params)
    return {path: shapes[path] for path in layers}


def influence_flops(
    model_cfg,
    shapes,
    *,
    positions,
    examples,
    ref_positions,
    caps,
    gradient_positions=None,
    kept_captures=True,
):
    """FLOP model of one influence stage (EK-FAC, per-example correction); see `run_scale`.

    positions / examples: of the curvature subsample; gradient_positions: of the domain-gradient
    pass (the α-error budget's final sample; default `positions`); ref_positions: of the reference
    set. kept_captures: the correction reads the factor pass's captures (no second model pass).
    """
    # A capture is a forward (2P per token) and a backward for the activations only (2P): 4P.
    capture = 4 * model_cfg.num_params()
    gradient_positions = positions if gradient_positions is None else gradient_positions
    out = {}
    # Factor pass: one capture plus the outer products x xᵀ and δ δᵀ of every token.
    outer = sum(2 * (a * a + b * b) for a, b in shapes.values())
    out["factors"] = positions * (capture + outer)
    # Correction: per example the cheaper exact order of projecting its T rows (2T(I² + O² + IO))
    # or its gradient X̃ᵀΔ (2TIO + 2IO(I + O)); a capture of its own unless the factor pass's
    # captures were kept.
    t = positions / max(examples, 1)
    per_example = sum(
        min(2 * t * (a * a + b * b + a * b), 2 * t * a * b + 2 * a * b * (a + b))
        for a, b in shapes.values()
    )
    out["eigen_correction"] = (0 if kept_captures else positions * capture) + examples * per_example
    # Domain gradients fused with the per-example terms of α (one capture, plus each example's
    # X̃ᵀΔ (2TIO per token row: 2IO) and its dot with the 1 + caps reference rows), and the
    # reference set (one capture).
    t_grad = sum(2 * a * b for a, b in shapes.values())
    dot = sum(2 * a * b for a, b in shapes.values()) * (1 + caps) / max(t, 1)
    out["gradients"] = gradient_positions * (capture + t_grad + dot) + ref_positions * capture
    # Eigendecompositions (~9 d³ each) and one inverse product per reference row.
    eigh = sum(9 * (a**3 + b**3) for a, b in shapes.values())
    out["eigh_and_inverse"] = eigh + (1 + caps) * sum(
        2 * (a * a * b + a * b * b) for a, b in shapes.values()
    )
    return out


def _rel_stderr(out: dict) -> float:
    """Median over domains of stderr / |α| in the "all" row (how well α's signs are resolved)."""
    a, se = np.asarray(out["matrix"][0]), np.asarray(out["stderr"][0], float)
    return float(np.nanmedian(se / np.maximum(np.abs(a), 1e-30)))


def _stderr_over_rms(out: dict) -> float:
    """Largest stderr over domains / RMS of α over domains, "all" row (what alpha_se bounds)."""
    a, se = np.asarray(out["matrix"][0]), np.asarray(out["stderr"][0], float)
    return float(np.nanmax(se) / max(float(np.sqrt(np.mean(a**2))), 1e-30))


def trained_d0(cfg, workdir: str):
    """(mesh, suite, model config, D0 mixture, params after one SFT round, that round's run_sft
    summary, its wall seconds): the round trained from the base model in workdir/round_0."""
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, workdir)
    model_cfg, base = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
    mix = mixture_lib.build_mixture(ids, None, seed=cfg.seed)
    rdir = os.path.join(workdir, "round_0")
    t0 = time.perf_counter()
    params = train_stage.train_round(cfg.train, cfg.data, model_cfg, mesh, rdir, suite, mix, base)
    wall = time.perf_counter() - t0
    with open(os.path.join(rdir, "train", "summary.json")) as f:
        return mesh, suite, model_cfg, mix, params, json.load(f), wall


def run_scale(scale: str, args, clock: CompileClock) -> dict:
    cfg = make_config(scale, args)
    with tempfile.TemporaryDirectory() as workdir:
        mesh, suite, model_cfg, mix, params, sft, sft_wall = trained_d0(cfg, workdir)
        calls = []
        for _ in range(2):  # first call (compiles) and steady state (jitted passes reused)
            t0 = time.perf_counter()
            out = influence_stage.influence_from_config(
                cfg, model_cfg, params, suite, mix, mesh
            ).to_json()
            end = time.perf_counter()
            calls.append(
                {
                    "wall_s": end - t0,
                    "compile_s": clock.between(t0, end),
                    "timings": out["timings"],
                    "compile_by_stage": stage_compile(clock, end, out["timings"]),
                }
            )

    epoch_s = sft["train_seconds"]
    items = mixture_lib.materialize(mix, suite.tokenized)
    sub = out["subsample_examples"]
    print(
        f"== {scale}: {model_cfg.num_params():,} params, {len(items)} training examples, "
        f"subsample {sub} ({out['subsample']}), operator {cfg.influence.operator}, "
        f"{jax.device_count()} {jax.default_backend()} device(s)"
    )
    print(
        f"SFT        wall {sft_wall:7.2f} s = compile {sft['compile_seconds']:.2f} s + steps "
        f"{epoch_s:.2f} s ({sft['total_steps']} steps, 1 epoch) + data and checkpoints"
    )
    for k, call in enumerate(calls):
        parts = ", ".join(
            f"{n} {t:.2f} (compile {call['compile_by_stage'][n]:.2f})"
            for n, t in call["timings"].items()
        )
        print(
            f"influence call {k + 1}: wall {call['wall_s']:7.2f} s, compile "
            f"{call['compile_s']:.2f} s; {parts}"
        )
    print(
        f"influence steady state {calls[1]['wall_s']:.2f} s = {calls[1]['wall_s'] / epoch_s:.3f} "
        f"× one SFT epoch (steps only); α 'all' row: median stderr/|α| {_rel_stderr(out):.3f}, "
        f"max stderr / RMS(α) {_stderr_over_rms(out):.3f}"
    )
    layers = layers_lib.select_layers(params, cfg.curvature.layers)
    shapes = layer_shapes(params, layers)
    total = sum(layers_lib.factor_bytes(a, b) for a, b in shapes.values())
    correction = sum(4 * a * b for a, b in shapes.values())  # EK-FAC: one eigenvalue per weight
    print(f"factor memory {total / 2**20:.3f} MiB + EK-FAC correction {correction / 2**20:.3f} MiB")
    seq_len = out["seq_len"]
    sub_items = influence_stage.subsample(suite, mix, cfg.curvature, cfg.seed)[0]  # curvature
    pos = padded_positions(sub_items, cfg.curvature.batch_size, seq_len, "pad")
    ref_pos = padded_positions(suite.reference_tokenized, cfg.influence.batch_size, seq_len, "pad")
    flops = influence_flops(
        model_cfg,
        shapes,
        positions=pos,
        gradient_positions=pos * sub / max(len(sub_items), 1),
        # the EK-FAC fit reads the factor pass's captures with the empirical Fisher only
        kept_captures=cfg.curvature.keep_captures_gib > 0
        and cfg.curvature.estimator == "empirical",
        examples=len(sub_items),
        ref_positions=ref_pos,
        caps=len(suite.capabilities),
    )
    sft_flops = sft["total_steps"] * cfg.train.batch_size * cfg.train.seq_len
    sft_flops *= model_cfg.flops_per_token(1)
    print(
        f"model: influence/SFT(1 ep) FLOPs {sum(flops.values()) / sft_flops:.3f} = "
        + " + ".join(f"{k} {v / sft_flops:.3f}" for k, v in flops.items())
    )
    return {
        "scale": scale,
        "examples": len(items),
        "subsample_examples": sub,
        "params": model_cfg.num_params(),
        "sft_epoch_s": round(epoch_s, 3),
        "influence_s": round(calls[1]["wall_s"], 3),
        "ratio": round(calls[1]["wall_s"] / epoch_s, 4),
        "influence_timings_s": {k: round(v, 3) for k, v in calls[1]["timings"].items()},
        "first_call": {
            "sft_compile_s": round(sft["compile_seconds"], 3),
            "sft_wall_s": round(sft_wall, 3),
            "influence_s": round(calls[0]["wall_s"], 3),
            "influence_compile_s": round(calls[0]["compile_s"], 3),
            "ratio": round(calls[0]["wall_s"] / epoch_s, 4),
        },
        "alpha_median_rel_stderr": round(_rel_stderr(out), 4),
        "alpha_max_stderr_over_rms": round(_stderr_over_rms(out), 4),
        "settings": {
            k: cfg.curvature[k]
            for k in (
                "batch_size",
                "subsample",
                "examples_per_domain",
                "max_examples_per_domain",
                "alpha_se_target",
                "sigma",
            )
        }
        | {"operator": cfg.influence.operator},
        "subsample": out["subsample"],
        "device": f"{jax.device_count()} {jax.default_backend()}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="demo", help="comma-separated: demo, large")
    parser.add_argument("--operator", default=None, help="identity|kfac|ekfac (config default)")
    parser.add_argument("--sigma", type=float, default=None, help="σ when --examples-per-domain=0")
    parser.add_argument(
        "--subsample", default=None, help="alpha_se | fixed | sigma (default: the product's)"
    )
    parser.add_argument(
        "--examples-per-domain",
        type=int,
        default=None,
        help="curvature.examples_per_domain (default: the product's; 0: σ of each domain)",
    )
    parser.add_argument(
        "--alpha-se-target", type=float, default=None, help="curvature.alpha_se_target"
    )
    parser.add_argument(
        "--max-examples-per-domain",
        type=int,
        default=None,
        help="curvature.max_examples_per_domain",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="curvature.batch_size = influence.batch_size"
    )
    parser.add_argument("--json", default="", help="also write the last line to this file")
    args = parser.parse_args()
    clock = CompileClock()
    scales = []
    for name in args.scales.split(","):
        scales.append(run_scale(name.strip(), args, clock))
        if len(scales) > 1:  # same shapes: the earlier scale's compilations are reused
            scales[-1]["first_call"]["note"] = "after an earlier scale in this process"
    project_llama()
    line = json.dumps({"scales": scales})
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(line + "\n")
    print(line)


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
            kept_captures=False,  # σ = 0.5 of the data: its captures outgrow any memory budget
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
