"""EK-FAC / K-FAC α against α from the exact GGN (conjugate gradient) on layers of a real model.

    PYTHONPATH=. python benchmarks/real_model_alpha_accuracy.py \
        --config configs/smollm2_bigbench.py:small,data=data/bigbench \
        --layers 'layers\\.(14|29)\\.mlp\\.down_proj' [--per_domain 8]

The model as loaded (no training: the pretrained SmolLM2-135M-Instruct for the default config),
the config's domains and reference set (at most --per_domain examples of each, with the influence
stage's batching), curvature restricted to --layers (two MLP layers by default). For each
operator the full α matrix (rows "all" + capabilities, columns domains) is computed through the
influence stage (`influence_from_config`), with the same σ-subsample, damping and estimator; the
reference is `cg` (exact GGN of the selected layers, solved by conjugate gradient: a dense block
of one 576×1536 layer would have 8·10^11 entries; all reference rows are solved together, one
batched GGN product per step; --cg_tol / --cg_max_iters bound the solve and the reached relative
residuals are printed with the results). Cost: every CG step runs the model forward over the
kept examples and a tangent and a transposed pass per reference row down to the lowest selected
layer, with the vocabulary-sized output tangent at every token — an accelerator job: on a shared
2-core CPU one batched product (8 vectors, 20 examples) took about 15 minutes. Printed: cosine,
Spearman and sign agreement of each operator's α with the reference, and their times; last line
one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from ideal_jax import sharding  # noqa: E402
from ideal_jax.data import mixture as mixture_lib  # noqa: E402
from ideal_jax.data import suite as suite_lib  # noqa: E402
from ideal_jax.influence import stage as influence_stage  # noqa: E402
from ideal_jax.model import loading  # noqa: E402

_build_operator = influence_stage.operators.build_operator


def load_config(spec: str):
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--layers", default=r"layers\.(14|29)\.mlp\.down_proj")
    parser.add_argument("--per_domain", type=int, default=8)
    parser.add_argument("--operators", default="identity,kfac,ekfac")
    parser.add_argument("--cg_tol", type=float, default=1e-6, help="relative residual to stop at")
    parser.add_argument("--cg_max_iters", type=int, default=200)
    args = parser.parse_args()
    influence_stage.operators.build_operator = functools.partial(
        _build_operator, cg_tol=args.cg_tol, cg_max_iters=args.cg_max_iters
    )

    cfg = load_config(args.config)
    with cfg.unlocked():
        cfg.progress = False
        cfg.curvature.layers = args.layers
        cfg.curvature.sigma = 1.0
        cfg.curvature.examples_per_domain = 0  # every kept example (σ = 1)
    workdir = tempfile.mkdtemp(prefix="alpha_accuracy_")
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, workdir)
    keep = {n: items[: args.per_domain] for n, items in suite.tokenized.items()}
    caps = {}
    ref = []
    for t in suite.reference_tokenized:
        if caps.get(t.domain, 0) < args.per_domain:
            caps[t.domain] = caps.get(t.domain, 0) + 1
            ref.append(t)
    suite = suite_lib.Suite(
        suite.domains, suite.reference, suite.tokenizer, keep, ref, suite.format_stats, {}
    )
    model_cfg, params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    ids = {n: [t.example_id for t in items] for n, items in keep.items()}
    mix = mixture_lib.build_mixture(ids, None, seed=cfg.seed)

    results, times = {}, {}
    for name in ["cg", *args.operators.split(",")]:
        with cfg.unlocked():
            cfg.influence.operator = name
        t0 = time.perf_counter()
        out = influence_stage.influence_from_config(
            cfg, model_cfg, params, suite, mix, mesh
        ).to_json()
        times[name] = time.perf_counter() - t0
        results[name] = np.asarray(out["matrix"], np.float64)
        if name == "cg":
            cg_info = out.get("operator_info", {})
            print(f"cg solves: {json.dumps(cg_info)}")
        print(f"{name:9s} {times[name]:7.1f} s  α[all] = {np.round(results[name][0], 4).tolist()}")
    ref_alpha = results["cg"].ravel()
    table = {}
    for name, alpha in results.items():
        if name == "cg":
            continue
        a = alpha.ravel()
        table[name] = {
            "cosine": float(a @ ref_alpha / (np.linalg.norm(a) * np.linalg.norm(ref_alpha))),
            "spearman": float(stats.spearmanr(a, ref_alpha).statistic),
            "sign_agreement": float(np.mean(np.sign(a) == np.sign(ref_alpha))),
            "seconds": times[name],
        }
        print(
            f"{name:9s} cosine {table[name]['cosine']:.3f}  spearman {table[name]['spearman']:.3f}"
            f"  signs {table[name]['sign_agreement']:.2f}"
        )
    print(
        json.dumps(
            {
                "layers": args.layers,
                "examples_per_domain": args.per_domain,
                "entries": int(ref_alpha.size),
                "cg_seconds": times["cg"],
                "cg_tol": args.cg_tol,
                "cg_solves": cg_info,
                "vs_exact_ggn": table,
            }
        )
    )


if __name__ == "__main__":
    main()
