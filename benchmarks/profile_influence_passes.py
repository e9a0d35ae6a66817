"""Each piece of ideal_jax's EK-FAC influence pipeline timed alone, beside Kronfluence's phases.

    PYTHONPATH=. python benchmarks/profile_influence_passes.py --size large [--repeats 2]

The model, tokens and settings are bench_vs_kronfluence.py's (its SIZES presets). ideal_jax's
pieces: the factor accumulation pass (kfac-jax updates), the eigendecompositions (finalize), the
EK-FAC eigenvalue-correction pass, the query gradients, the inverse products, and the per-example
score pass; plus one bare forward + backward capture pass of the training batches (the floor every
pass pays). Kronfluence's phases: covariance, eigendecomposition, lambda, pairwise scores. Each
piece is timed `--repeats` times after one warm-up (the minimum is reported; blocking on the
result). Also printed: analytic FLOPs of the per-layer work of each pass. Last line: one JSON
object with every figure and the 1-minute load average at the start and end.
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
import numpy as np  # noqa: E402

from benchmarks import bench_vs_kronfluence as bvk  # noqa: E402
from ideal_jax.curvature import captures, ekfac, operators  # noqa: E402
from ideal_jax.curvature import kfac as kfac_lib  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.curvature import problem as problem_lib  # noqa: E402
from ideal_jax.influence import gradients, kronfluence_ref, per_example  # noqa: E402
from ideal_jax.model import hf_io  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = jax.block_until_ready(fn())  # warm-up (compilation)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def ideal_jax_pieces(path, train, query, args) -> dict:
    model_cfg = hf_io.load_hf_config(path)
    params = hf_io.load_hf_params(path, model_cfg)
    layers = layers_lib.select_layers(params, "mlp")
    problem = problem_lib.lm_problem(model_cfg, layers)
    curvature = kfac_lib.curvature_for(problem, args.estimator)
    batches = [bvk._batch(train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    rng = jax.random.key(0)
    r = args.repeats
    t = {}

    def accumulate():
        state = None
        for i, batch in enumerate(batches):
            if state is None:
                state = curvature.init(params, batch, rng)
            state = curvature.update(state, params, batch, jax.random.fold_in(rng, i))
        return state

    t["factor_pass"], raw = _timed(accumulate, r)
    t["eigh"], state = _timed(lambda: curvature.finalize(raw), r)
    t["correction_pass"], state = _timed(
        lambda: ekfac.fit_eigen_correction(curvature, state, params, batches, rng), r
    )
    selected, rest = layers_lib.split_params(params, layers)
    capture = jax.jit(
        lambda p, b: captures.layer_captures(
            problem,
            *layers_lib.split_params(p, layers),
            b,
            captures.loss_cotangent(problem, b, problem_lib.loss_rows(problem, b)[1]),
        )[1]
    )
    t["capture_pass"], _ = _timed(lambda: [capture(params, b) for b in batches], r)
    op = operators.build_operator(
        "ekfac",
        problem=problem,
        params=params,
        curvature=curvature,
        state=state,
        damping=0.1,
        relative_damping=True,
    )
    rows = [(q, bvk._batch(query[q : q + 1], q)) for q in range(len(query))]
    names = [f"q{q}" for q in range(len(query))]
    t["query_gradients"], qgrads = _timed(
        lambda: gradients.single_group_mean_gradients(problem, params, rows, names), r
    )
    rows_q = [qgrads.row(q) for q in range(len(names))]
    t["inverse_products"], vs = _timed(lambda: op.many(rows_q), r)
    t["score_pass"], _ = _timed(
        lambda: per_example.per_example_scores(problem, params, batches, vs), r
    )
    t["factors_total"] = t["factor_pass"] + t["eigh"] + t["correction_pass"]
    t["scores_total"] = t["query_gradients"] + t["inverse_products"] + t["score_pass"]
    return {k: round(v, 3) for k, v in t.items()}


def kronfluence_pieces(path, train, query, args) -> dict:
    import torch
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    torch.set_num_threads(args.threads)
    modules = [f"model.layers.{i}.mlp.{m}" for i in range(args.layers) for m in bvk.MLP]
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    task = kronfluence_ref.make_task(modules)
    model = prepare_model(model, task)
    train_ds = kronfluence_ref.dataset([bvk._batch(train)])
    query_ds = kronfluence_ref.dataset([bvk._batch(query)])
    fa = FactorArguments(strategy="ekfac")
    best: dict = {}
    with tempfile.TemporaryDirectory() as out_dir:
        an = Analyzer("p", model, task, output_dir=out_dir, disable_tqdm=True)
        kw = dict(factor_args=fa, overwrite_output_dir=True)
        for call in range(1 + args.repeats):  # call 0 is the warm-up
            name = f"f{call}"

            def phase(key, fn, *a, _call=call, **kws):
                t0 = time.perf_counter()
                fn(*a, **kws)
                if _call > 0:
                    best[key] = min(best.get(key, float("inf")), time.perf_counter() - t0)

            phase(
                "covariance",
                an.fit_covariance_matrices,
                name,
                train_ds,
                per_device_batch_size=args.batch,
                **kw,
            )
            phase("eigh", an.perform_eigendecomposition, name, **kw)
            phase(
                "lambda",
                an.fit_lambda_matrices,
                name,
                train_ds,
                per_device_batch_size=args.batch,
                **kw,
            )
            phase(
                "scores",
                an.compute_pairwise_scores,
                f"s{call}",
                name,
                query_ds,
                train_ds,
                per_device_query_batch_size=args.query,
                per_device_train_batch_size=args.batch,
                score_args=ScoreArguments(damping_factor=None),
                overwrite_output_dir=True,
            )
    best["factors_total"] = best["covariance"] + best["eigh"] + best["lambda"]
    return {k: round(v, 3) for k, v in best.items()}


def flops(args) -> dict:
    """Analytic GFLOPs of the tracked layers' work per pass (all examples, all layers)."""
    h, n, q = args.hidden, args.train, args.query
    t = args.seq - 1
    shapes = [(h, 4 * h), (h, 4 * h), (4 * h, h)] * args.layers  # (in, out) per MLP layer
    f = {"factor_covariances": 0.0, "correction_rows_first": 0.0, "correction_grad_first": 0.0}
    f.update({"scores_grad_then_dot": 0.0, "scores_per_query": 0.0})
    for i, o in shapes:
        f["factor_covariances"] += 2 * n * t * (i * i + o * o)
        f["correction_rows_first"] += 2 * n * t * (i * i + o * o + i * o)
        f["correction_grad_first"] += 2 * n * (t * i * o + i * o * (i + o))
        f["scores_grad_then_dot"] += 2 * n * (t * i * o + i * o * q)
        f["scores_per_query"] += 2 * n * q * t * (i * o + o)
    return {k: round(v / 1e9, 1) for k, v in f.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=sorted(bvk.SIZES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--estimator", default="empirical")
    parser.add_argument("--skip-kronfluence", action="store_true")
    args = parser.parse_args()
    args = argparse.Namespace(**{**vars(args), **bvk.SIZES[args.size]})
    load0 = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    train = rng.integers(0, args.vocab, (args.train, args.seq)).astype(np.int64)
    query = rng.integers(0, args.vocab, (args.query, args.seq)).astype(np.int64)
    out = {"size": args.size, "gflops": flops(args)}
    print("GFLOPs:", out["gflops"], flush=True)
    with tempfile.TemporaryDirectory() as path:
        bvk.make_checkpoint(path, args)
        out["ideal_jax"] = ideal_jax_pieces(path, train, query, args)
        print("ideal_jax:", out["ideal_jax"], flush=True)
        if not args.skip_kronfluence and kronfluence_ref.available():
            out["kronfluence"] = kronfluence_pieces(path, train, query, args)
            print("kronfluence:", out["kronfluence"], flush=True)
    out["load_average_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
