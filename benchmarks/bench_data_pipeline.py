"""Throughput of the data pipeline (formatting + batching) on the demo suite.

    python benchmarks/bench_data_pipeline.py [--scale 10] [--seq_len 128] [--batch_size 32]

(with the package installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root).

Prints examples/s and tokens/s for: loading records, tokenizing with the chat template and with the
plain template, and building one epoch of batches in "pad" and "pack" modes. `--scale`
multiplies the default demo training volumes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from ideal_jax.data import batching, demo_suite, formatting  # noqa: E402
from ideal_jax.data.domains import load_domains


def _report(stage: str, seconds: float, n_examples: int, n_tokens: int | None) -> None:
    line = f"{stage:<28} {seconds * 1e3:9.1f} ms  {n_examples / seconds:12,.0f} examples/s"
    if n_tokens is not None:
        line += f"  {n_tokens / seconds:14,.0f} tokens/s"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="multiplies the demo train sizes")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sizes = {k: v * args.scale for k, v in demo_suite.DEFAULT_TRAIN_SIZES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = demo_suite.build_demo_suite(tmp, seed=args.seed, train_sizes=sizes)
        print(
            f"built demo suite ({sum(sizes.values()):,} train examples) in "
            f"{time.perf_counter() - start:.2f} s"
        )

        start = time.perf_counter()
        domains = load_domains(paths["train"])
        examples = [ex for exs in domains.values() for ex in exs]
        _report("load + normalize", time.perf_counter() - start, len(examples), None)

        tokenizer = demo_suite.build_tokenizer()
        tokenized = {}
        for name, use_template in (("chat template", True), ("plain template", False)):
            start = time.perf_counter()
            kept, stats = formatting.tokenize_examples(
                examples, tokenizer, max_len=args.seq_len, use_chat_template=use_template
            )
            seconds = time.perf_counter() - start
            n_tokens = sum(len(t.input_ids) for t in kept)
            _report(f"tokenize ({name})", seconds, len(examples), n_tokens)
            assert stats.n_kept == len(examples), stats
            tokenized[name] = kept

        kept = tokenized["chat template"]
        n_tokens = sum(len(t.input_ids) for t in kept)
        for mode in batching.MODES:
            start = time.perf_counter()
            n_rows = n_weighted = 0
            for batch in batching.iterate_batches(
                kept, args.batch_size, args.seq_len, mode, seed=args.seed, epoch=0
            ):
                n_rows += batch["tokens"].shape[0]
                n_weighted += int(batch["weights"].sum())
            seconds = time.perf_counter() - start
            _report(f"batch epoch ({mode})", seconds, len(kept), n_tokens)
            fill = n_tokens / (n_rows * args.seq_len)
            print(
                f"{'':28} rows {n_rows:,}, non-pad fraction {fill:.2f}, "
                f"response targets {n_weighted:,}"
            )


if __name__ == "__main__":
    main()
