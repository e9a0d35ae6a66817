"""EK-FAC / K-FAC α against α from the exact GGN (conjugate gradient) on layers of a real model.

    PYTHONPATH=. python benchmarks/real_model_alpha_accuracy.py \
        --config configs/smollm2_bigbench.py:small,data=data/bigbench \
        --layers 'layers\\.(28|29)\\.mlp\\.down_proj' [--per_domain 8] [--reference cg_block]

The model as loaded (no training: the pretrained SmolLM2-135M-Instruct for the default config),
the config's domains and reference set (at most --per_domain examples of each, with the influence
stage's batching), curvature restricted to --layers (two MLP layers by default). For each
operator the full α matrix (rows "all" + capabilities, columns domains) is computed through the
influence stage (`influence_from_config`), with the same σ-subsample, damping and estimator.

The reference (--reference) is the exact GGN of the selected layers solved by conjugate gradient
(a dense block of one 576×1536 layer would have 8·10^11 entries): `cg_block` (default) drops the
cross-layer blocks — `exact_block`, the matrix K-FAC / EK-FAC approximate, so the comparison
measures their Kronecker and eigenvalue approximations; `cg` keeps them (the whole GGN of the
selected layers). All reference rows are solved together (one batched GGN product per step),
preconditioned by --cg_preconditioner (the damped EK-FAC inverse by default: unpreconditioned CG
on the whole GGN of two SmolLM2 layers had not converged after 150 steps); --cg_tol /
--cg_max_iters bound the solve, and the steps and true relative residuals reached are printed with
the results. Cost: every CG step runs the model from the lowest selected layer over the kept
examples, and a tangent and a transposed pass per reference row. Printed: cosine, Spearman and
sign agreement of each operator's α with the reference, and their times; last line one JSON
object.
"""

from __future__ import annotations

import argparse
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
from ideal_jax.configlib.loading import load_config_spec  # noqa: E402
from ideal_jax.data import mixture as mixture_lib  # noqa: E402
from ideal_jax.data import suite as suite_lib  # noqa: E402
from ideal_jax.influence import stage as influence_stage  # noqa: E402
from ideal_jax.model import loading  # noqa: E402


def woodbury_exact_block(*, problem, params, batches, damping, relative_damping, **_):
    """exact_block of the empirical Fisher, F_b = (1/W) Σ_r u_r,b u_r,bᵀ with u_r,b the row
    (= example) gradient of layer b: rank ≤ the number of examples, so (F_b + λ_b)⁻¹ v is exact
    and cheap by Woodbury, (1/λ)[v − Uᵀ(Wλ I + U Uᵀ)⁻¹ U v], in float64 — a reference that needs
    no iteration, for a real layer whose dense block would not fit (λ_b relative: damping ×
    trace / dim, as `exact_block`)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from ideal_jax.curvature import exact as exact_lib
    from ideal_jax.curvature import layers as layers_lib

    selected, rest = layers_lib.split_params(params, problem.layers)
    batches = list(batches() if callable(batches) else batches)
    w = exact_lib.total_weight(batches)
    step = jax.jit(lambda s, r, b: exact_lib.per_row_gradients(problem, s, r, b))
    rows = {p: [] for p in problem.layers}
    for b in batches:
        g = step(selected, rest, b)
        for p in problem.layers:
            rows[p].append(np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(g[p]), np.float64))
    solve, lam = {}, {}
    for p in problem.layers:
        u = np.concatenate(rows[p])
        u = u[np.any(u != 0, axis=1)]  # padding rows
        lam[p] = damping * float(np.sum(u**2)) / (w * u.shape[1]) if relative_damping else damping
        solve[p] = (u, np.linalg.inv(w * lam[p] * np.eye(len(u)) + u @ u.T))

    def apply(v: dict) -> dict:
        out = {}
        for p, (u, core) in solve.items():
            flat, unravel = ravel_pytree(v[p])
            x = np.asarray(flat, np.float64)
            out[p] = unravel(jnp.asarray((x - u.T @ (core @ (u @ x))) / lam[p], jnp.float32))
        return out

    return influence_stage.operators.InverseOperator("exact_block", lam, apply)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--layers", default=r"layers\.(14|29)\.mlp\.down_proj")
    parser.add_argument("--per_domain", type=int, default=8)
    parser.add_argument("--operators", default="identity,kfac,ekfac")
    parser.add_argument(
        "--reference", default="cg_block", choices=("cg_block", "cg", "empirical_woodbury")
    )
    parser.add_argument("--cg_preconditioner", default="ekfac", choices=("none", "kfac", "ekfac"))
    parser.add_argument("--cg_tol", type=float, default=1e-5, help="relative residual to stop at")
    parser.add_argument("--cg_max_iters", type=int, default=200)
    args = parser.parse_args()

    cfg = load_config_spec(args.config)
    with cfg.unlocked():
        cfg.influence.cg_preconditioner = args.cg_preconditioner
        cfg.influence.cg_tol = args.cg_tol
        cfg.influence.cg_max_iters = args.cg_max_iters
        cfg.progress = False
        cfg.curvature.layers = args.layers
        cfg.curvature.sigma = 1.0
        cfg.curvature.examples_per_domain = 0  # every kept example (σ = 1)
        if args.reference == "empirical_woodbury":  # every operator on the empirical Fisher
            cfg.curvature.estimator = "empirical"
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
    reference = args.reference
    build = influence_stage.operators.build_operator
    if reference == "empirical_woodbury":  # the stage's exact_block, solved by Woodbury instead
        influence_stage.operators.build_operator = lambda name, **kw: (
            woodbury_exact_block(**kw) if name == "exact_block" else build(name, **kw)
        )
    for name in [reference, *args.operators.split(",")]:
        with cfg.unlocked():
            cfg.influence.operator = "exact_block" if name == "empirical_woodbury" else name
        t0 = time.perf_counter()
        out = influence_stage.influence_from_config(
            cfg, model_cfg, params, suite, mix, mesh
        ).to_json()
        times[name] = time.perf_counter() - t0
        results[name] = np.asarray(out["matrix"], np.float64)
        if name == reference:
            cg_info = out.get("operator_info", {})
            print(f"{reference} solves: {json.dumps(cg_info)}")
        print(f"{name:9s} {times[name]:7.1f} s  α[all] = {np.round(results[name][0], 4).tolist()}")
    ref_alpha = results[reference].ravel()
    table = {}
    for name, alpha in results.items():
        if name == reference:
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
                "reference": reference,
                "cg_preconditioner": args.cg_preconditioner,
                "cg_seconds": times[reference],
                "cg_tol": args.cg_tol,
                "cg_solves": cg_info,
                "vs_reference": table,
            }
        )
    )


if __name__ == "__main__":
    main()
