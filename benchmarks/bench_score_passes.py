"""Same-process A/B of the per-layer math of the EK-FAC correction and per-example score passes.

    PYTHONPATH=. python benchmarks/bench_score_passes.py --size large [--repeats 7]

The model, tokens and shapes are bench_vs_kronfluence.py's (its SIZES presets). One training batch
is captured once (every tracked layer's inputs X̃ [B, T, I] and output gradients Δ [B, T, O],
curvature/captures.py); then, interleaved, `--repeats` times each, over all tracked layers:

  correction  before: the previous formulation — examples in chunks of 8, one batched
                      [chunk, I, O] product per chunk (rows rotated inside the chunk, or X̃ᵀΔ formed
                      and rotated, by the previous both-or-neither FLOP rule), squared and summed
                      over the chunk;
              after:  ekfac.squared_projections (rows rotated once per batch per side where
                      cheaper, then one plain I×O product per example accumulated in place);
  scores      before: chunks of 8, batched [chunk, I, O] per-example gradients dotted with the
                      R vectors; after: per_example.example_dots (one example at a time).

The same four again as whole pass steps ("*_step": the capture's forward and backward pass and
the per-layer math in one jitted program, as the library runs them). Before and after are
checked equal (relative error printed) before timing. Medians are reported,
with the 1-minute load average at the start and end; the last line is one JSON object.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_vs_kronfluence as bvk  # noqa: E402
from ideal_jax.curvature import captures, ekfac  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.curvature import problem as problem_lib  # noqa: E402
from ideal_jax.influence import per_example  # noqa: E402
from ideal_jax.model import hf_io  # noqa: E402


def correction_before(x_bti, d_bto, qa, qg, chunk=8):
    """The previous captured-correction body (chunks of examples, batched products)."""
    b, t, i = x_bti.shape
    o = d_bto.shape[-1]
    chunk = max(c for c in range(1, min(b, chunk) + 1) if b % c == 0)
    xs = (x_bti.reshape(b // chunk, chunk, t, i), d_bto.reshape(b // chunk, chunk, t, o))
    rows_first = t * (i * i + o * o + i * o) <= t * i * o + i * o * (i + o)

    def body(carry, x_d):
        x_cti, d_cto = x_d
        if rows_first:
            g_cag = jnp.einsum("CTA,CTG->CAG", x_cti @ qa, d_cto @ qg)
        else:
            g_cio = jnp.einsum("CTI,CTO->CIO", x_cti, d_cto)
            g_cag = jnp.einsum("IA,CIO,OG->CAG", qa, g_cio, qg)
        return carry + jnp.sum(g_cag**2, axis=0), None

    return jax.lax.scan(body, jnp.zeros((i, o), jnp.float32), xs)[0]


def scores_before(x_bti, d_bto, v_rio, chunk=8):
    """The previous score body: (c [B, R], Σ_n X̃_nᵀΔ_n) from batched chunk products."""
    b, t, i = x_bti.shape
    o = d_bto.shape[-1]
    chunk = max(c for c in range(1, min(b, chunk) + 1) if b % c == 0)
    xs = (x_bti.reshape(b // chunk, chunk, t, i), d_bto.reshape(b // chunk, chunk, t, o))

    def body(g_io, x_d):
        g_cio = jnp.einsum("CTI,CTO->CIO", *x_d)
        return g_io + jnp.sum(g_cio, axis=0), -jnp.einsum("CIO,RIO->CR", g_cio, v_rio)

    g_io, c_ncr = jax.lax.scan(body, jnp.zeros((i, o), jnp.float32), xs)
    return c_ncr.reshape(b, -1), g_io


def _all_layers(fn):
    return jax.jit(lambda caught, extra: {p: fn(*xd, *extra[p]) for p, xd in caught.items()})


def _rel(a, b) -> float:
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30)) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=sorted(bvk.SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()
    args = argparse.Namespace(**{**vars(args), **bvk.SIZES[args.size]})
    load0 = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int64)
    with tempfile.TemporaryDirectory() as path:
        bvk.make_checkpoint(path, args)
        cfg = hf_io.load_hf_config(path)
        params = hf_io.load_hf_params(path, cfg)
    layers = layers_lib.select_layers(params, "mlp")
    problem = problem_lib.lm_problem(cfg, layers)
    batch = bvk._batch(tokens)
    selected, rest = layers_lib.split_params(params, layers)
    cot = captures.loss_cotangent(problem, batch, problem_lib.loss_rows(problem, batch)[1])
    caught = jax.jit(lambda s, r, b: captures.layer_captures(problem, s, r, b, cot)[1])(
        selected, rest, batch
    )
    keys = iter(jax.random.split(jax.random.key(0), 4 * len(caught)))

    def orthonormal(n):
        return jnp.linalg.qr(jax.random.normal(next(keys), (n, n)))[0]

    bases = {
        p: (orthonormal(x.shape[-1]), orthonormal(d.shape[-1])) for p, (x, d) in caught.items()
    }
    vs = {
        p: (jax.random.normal(next(keys), (args.query, x.shape[-1], d.shape[-1])),)
        for p, (x, d) in caught.items()
    }

    def step(fn):
        """The whole pass step: one capture (forward + backward) of the batch, then `fn` per
        layer, in one jitted program (as in the library's passes)."""

        def run(extra):
            caught = captures.layer_captures(problem, selected, rest, batch, cot)[1]
            return {p: fn(*xd, *extra[p]) for p, xd in caught.items()}

        f = jax.jit(run)
        return lambda _caught, extra: f(extra)

    fns = {
        "correction_step_before": (step(correction_before), bases),
        "correction_step_after": (step(ekfac.squared_projections), bases),
        "scores_step_before": (step(scores_before), vs),
        "scores_step_after": (step(per_example.example_dots), vs),
        "correction_before": (_all_layers(correction_before), bases),
        "correction_after": (_all_layers(ekfac.squared_projections), bases),
        "scores_before": (_all_layers(scores_before), vs),
        "scores_after": (_all_layers(per_example.example_dots), vs),
    }
    outs = {k: jax.block_until_ready(f(caught, extra)) for k, (f, extra) in fns.items()}
    rel = {
        k: _rel(outs[f"{k}_after"], outs[f"{k}_before"])
        for k in ("correction", "scores", "correction_step", "scores_step")
    }
    print("after vs before, max relative difference:", rel, flush=True)
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, (f, extra) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(caught, extra))
            times[k].append(time.perf_counter() - t0)
    med = {k: round(float(np.median(v)) * 1e3, 1) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:24s} median {v:8.1f} ms per batch of {args.batch} (all tracked layers)")
    result = {
        "size": args.size,
        "batch": args.batch,
        "seq": args.seq,
        "hidden": args.hidden,
        "layers": args.layers,
        "query": args.query,
        "median_ms": med,
        "speedup": {
            k: round(med[f"{k}_before"] / med[f"{k}_after"], 2)
            for k in ("correction", "scores", "correction_step", "scores_step")
        },
        "max_relative_difference": rel,
        "repeats": args.repeats,
        "load_average_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
