"""Same-process before/after of ideal_jax's whole EK-FAC pipeline (factors + correction + scores).

    PYTHONPATH=. python benchmarks/bench_pipeline_ab.py --size large [--rounds 2]

bench_vs_kronfluence.py's ideal_jax side (its SIZES presets, the same model and tokens), run in
alternating rounds with the per-layer bodies of the correction and score passes set to the
previous formulation ("before": bench_score_passes.correction_before / scores_before, swapped in
for ekfac.squared_projections / per_example.example_dots, the jitted steps rebuilt) and to the
library's ("after"). Each round is bench_vs_kronfluence.run_ideal_jax: a first call (compilation)
and a steady-state call; the steady-state figures are reported (median over rounds), with the
1-minute load average at the start and end. Before and after scores are checked equal. Last line:
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import bench_score_passes as bsp  # noqa: E402
from benchmarks import bench_vs_kronfluence as bvk  # noqa: E402
from ideal_jax.curvature import ekfac  # noqa: E402
from ideal_jax.influence import per_example  # noqa: E402

AFTER = {"squared_projections": ekfac.squared_projections, "example_dots": per_example.example_dots}
BEFORE = {"squared_projections": bsp.correction_before, "example_dots": bsp.scores_before}


def _use(bodies: dict) -> None:
    """Sets the per-layer bodies (module globals read when the steps are traced) and drops the
    jitted steps so that the next call traces them again."""
    ekfac.squared_projections = bodies["squared_projections"]
    per_example.example_dots = bodies["example_dots"]
    ekfac._correction_jit.cache_clear()
    per_example._scores_jit.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=sorted(bvk.SIZES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--estimator", default="empirical")
    args = parser.parse_args()
    args = argparse.Namespace(**{**vars(args), **bvk.SIZES[args.size]})
    load0 = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    train = rng.integers(0, args.vocab, (args.train, args.seq)).astype(np.int64)
    query = rng.integers(0, args.vocab, (args.query, args.seq)).astype(np.int64)
    steady = {"before": [], "after": []}
    scores = {}
    with tempfile.TemporaryDirectory() as path:
        bvk.make_checkpoint(path, args)
        for r in range(args.rounds):
            for name, bodies in (("before", BEFORE), ("after", AFTER)):
                _use(bodies)
                out, scores[name] = bvk.run_ideal_jax(path, train, query, args)
                steady[name].append(out[2])
                print(f"round {r} {name}: steady {out[2]}", flush=True)
    _use(AFTER)
    diff = float(
        np.max(np.abs(scores["after"] - scores["before"])) / np.max(np.abs(scores["before"]))
    )
    med = {
        name: {k: round(float(np.median([c[k] for c in calls])), 3) for k in calls[0]}
        for name, calls in steady.items()
    }
    result = {
        "size": args.size,
        "rounds": args.rounds,
        "steady_median_s": med,
        "speedup": {k: round(med["before"][k] / med["after"][k], 2) for k in med["after"]},
        "scores_max_relative_difference": diff,
        "load_average_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
