"""Influence of training examples on query examples, from the command line.

    python -m ideal_jax.analyze --model PATH --train train.jsonl --query query.jsonl --out DIR \\
        [--operator ekfac] [--damping 0.1] [--absolute_damping] [--layers mlp] [--factors DIR2]

PATH is a Hugging Face safetensors directory or a `.gguf` file; the data files hold records in any
form ideal_jax reads (chat `messages`, ShareGPT, Alpaca, `prompt`/`response`), training records
optionally with a `domain`, queries optionally with a `capability`. Writes

    DIR/scores.jsonl    one row per training example (file order): id, domain, record, tokens,
                        mean score over the queries, score per query id
    DIR/scores.npy      the [train, query] score matrix (float32, rows and columns in file order)
    DIR/alpha.json      per-domain α (rows "all" + each query capability) with standard errors
    DIR/analysis.json   settings, units, damping per layer, query ids, timings
    DIR/factors/        the fitted curvature (reused by a later run with the same model, training
                        data and curvature settings: pass --factors DIR/factors to score another
                        query set into another DIR)

and prints one line per stage and the training examples with the lowest and highest mean score.
A score is the first-order change of the query's mean loss when the training example is
upweighted: NEGATIVE = helpful. Units and Kronfluence's conventions: docs/influence_conventions.md.

Bad input (a missing file, a record without the needed field, an empty query set, a query with no
response token) exits with status 2 and one line naming the file, the record and the field.
Existing results in DIR are never overwritten unless --overwrite is given, and then only once the
new ones are complete (each file is written under a temporary name and renamed).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

from ideal_jax.utils.errors import InputError

OUTPUTS = ("scores.jsonl", "scores.npy", "alpha.json", "analysis.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ideal_jax.influence.analysis_io import Settings

    d = Settings()
    p = argparse.ArgumentParser(
        prog="python -m ideal_jax.analyze", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", required=True, help="Hugging Face directory or .gguf file")
    p.add_argument("--train", required=True, help="training records (JSONL / JSON / Parquet)")
    p.add_argument("--query", required=True, help="query records (JSONL / JSON / Parquet)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--factors", default=None, help="curvature cache directory (DIR/factors)")
    p.add_argument(
        "--operator", default=d.operator, help="identity|kfac|ekfac|exact|exact_block|cg|cg_block"
    )
    p.add_argument("--damping", type=float, default=d.damping)
    p.add_argument(
        "--absolute_damping",
        action="store_true",
        help="--damping is λ itself (units of the mean-loss curvature), not × mean eigenvalue",
    )
    p.add_argument("--layers", default=d.layers, help="mlp | attention | all_linear | regexes")
    p.add_argument("--estimator", default=d.estimator, help="fisher | empirical")
    p.add_argument("--correction", default=d.correction, help="per_example | per_batch")
    p.add_argument("--scaling", default=d.scaling, help="α scaling: paper | exact")
    p.add_argument("--reference_weighting", default=d.reference_weighting)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--max_len", type=int, default=d.max_len)
    p.add_argument("--truncate", default=d.truncate)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--top", type=int, default=5, help="examples shown at each end of the table")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    return p.parse_args(argv)


def _say(message: str) -> None:
    print(f"[analyze] {message}", file=sys.stderr, flush=True)


def table(result, top: int) -> str:
    """The `top` training examples with the lowest (most helpful) and highest mean scores."""
    import numpy as np

    mean = result.mean_scores()
    order = np.argsort(mean, kind="stable")
    helpful = [n for n in order[:top] if mean[n] < 0]
    harmful = [n for n in order[::-1][:top] if mean[n] > 0]
    lines = [
        f"{len(result.train)} training examples × {len(result.query)} queries; "
        "score = change of the query's mean loss when the example is upweighted (< 0: helpful)",
        f"{'':10} {'mean score':>12}  {'domain':<16} id",
    ]
    for label, idx in (("helpful", helpful), ("harmful", harmful)):
        for n in idx:
            lines.append(
                f"{label:10} {mean[n]:>12.4g}  {result.train.groups[n]:<16} {result.train.ids[n]}"
            )
    alpha = result.alpha
    lines.append(
        "α (row 'all'): " + ", ".join(f"{d} {a:.4g}" for d, a in zip(alpha.domains, alpha.row()))
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    from ideal_jax.influence.analyzer import Analyzer
    from ideal_jax.utils import progress

    progress.configure(enabled=sys.stderr.isatty())
    existing = [
        os.path.join(args.out, n) for n in OUTPUTS if os.path.exists(os.path.join(args.out, n))
    ]
    if existing and not args.overwrite:  # before any work
        raise InputError(
            "results already exist; pass --overwrite or choose another --out", path=existing[0]
        )
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise InputError("--out names a file, not a directory", path=args.out)
    for name in ("train", "query"):
        if not os.path.exists(getattr(args, name)):
            raise InputError("no such file or directory", path=getattr(args, name), field=name)
    t0 = time.perf_counter()
    _say(f"model {args.model}; training data {args.train}")
    analyzer = Analyzer(
        args.model,
        args.train,
        tokenizer=args.tokenizer,
        factors_dir=args.factors or os.path.join(args.out, "factors"),
        log=_say,
        layers=args.layers,
        operator=args.operator,
        estimator=args.estimator,
        correction=args.correction,
        damping=args.damping,
        relative_damping=not args.absolute_damping,
        scaling=args.scaling,
        reference_weighting=args.reference_weighting,
        batch_size=args.batch_size,
        max_len=args.max_len,
        truncate=args.truncate,
        seed=args.seed,
    )
    _say(
        f"{len(analyzer.train)} training examples in {len(analyzer.train.group_names)} domain(s); "
        f"{len(analyzer.layers)} layers; operator {args.operator}"
    )
    result = analyzer.score(args.query)
    if result.factors_file:
        _say(f"curvature factors: {result.factors_file}")
    paths = result.write(args.out, overwrite=args.overwrite)
    print(table(result, args.top))
    _say(f"wrote {', '.join(sorted(paths))} to {args.out} in {time.perf_counter() - t0:.1f} s")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output we may not write: user error
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not e.filename:
            raise
        print(f"error: file {e.filename}: cannot write it ({e.strerror})", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "status": "done"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
