"""Kronfluence (PyTorch) run on ideal_jax's batch layout: the reference the influence scores are
compared with (benchmarks/bench_vs_kronfluence.py, tests/test_analyzer.py's slow test).

Optional, for benchmarks and tests only: needs torch and kronfluence (`pip install --no-deps
kronfluence einops einconv`); nothing in the package imports this module. A batch here is an
ideal_jax Batch (docs/architecture.md) turned into tensors: (tokens, attention mask = segment_ids
!= 0, targets, weights). The task's loss is Kronfluence's convention, the SUM over the example's
weighted tokens of the cross-entropy (docs/influence_conventions.md), the measurement the same loss
of the query; targets are the data's (empirical Fisher) or sampled from the model (true Fisher).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence

import numpy as np


def available() -> bool:
    try:
        import kronfluence  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def dataset(batches: Sequence[dict]):
    """A torch TensorDataset of the rows of ideal_jax batches ([B, T] numpy fields each)."""
    import torch

    cat = lambda key, dtype: torch.as_tensor(
        np.concatenate([np.asarray(b[key]) for b in batches]), dtype=dtype
    )
    tokens = cat("tokens", torch.long)
    mask = torch.as_tensor(
        np.concatenate([np.asarray(b["segment_ids"]) != 0 for b in batches]), dtype=torch.long
    )
    return torch.utils.data.TensorDataset(
        tokens, mask, cat("targets", torch.long), cat("weights", torch.float32)
    )


def make_task(modules: Sequence[str], *, sample_targets: bool = False):
    """A kronfluence Task over `dataset` rows: summed weighted cross-entropy, tracked `modules`
    (torch module names, e.g. "model.layers.0.mlp.gate_proj")."""
    import torch
    from kronfluence.task import Task

    class WeightedLmTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            tokens, mask, targets, weights = batch
            logits = model(input_ids=tokens, attention_mask=mask).logits.float()
            logits = logits.reshape(-1, logits.size(-1))
            if sample and sample_targets:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), -1)
                    targets = torch.multinomial(probs, 1).flatten()
            else:
                targets = targets.flatten()
            losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            return torch.sum(losses * weights.flatten())

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return list(modules)

        def get_attention_mask(self, batch):
            return batch[1]

    return WeightedLmTask()


def pairwise_scores(
    model_dir: str,
    train_ds,
    query_ds,
    modules: Sequence[str],
    *,
    strategy: str = "ekfac",
    damping_factor: float | None = None,
    sample_targets: bool = False,
    train_batch_size: int = 32,
    query_batch_size: int = 8,
    threads: int = 2,
    calls: int = 1,
) -> tuple[dict, np.ndarray, dict]:
    """(timings per call, scores [Q, N] of the last call, mean EK-FAC λ per tracked module).

    `damping_factor=None` is Kronfluence's heuristic, 0.1 × the mean eigenvalue of each module.
    Each call fits the factors and scores again (the first includes warm-up).
    """
    import torch
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    torch.set_num_threads(threads)
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    task = make_task(modules, sample_targets=sample_targets)
    model = prepare_model(model, task)
    timings, scores, lambda_means = {}, None, {}
    with tempfile.TemporaryDirectory() as out_dir:
        analyzer = Analyzer("ref", model, task, output_dir=out_dir, disable_tqdm=True)
        for call in range(1, calls + 1):
            t0 = time.perf_counter()
            analyzer.fit_all_factors(
                f"f{call}",
                train_ds,
                per_device_batch_size=train_batch_size,
                factor_args=FactorArguments(strategy=strategy),
                overwrite_output_dir=True,
            )
            t1 = time.perf_counter()
            analyzer.compute_pairwise_scores(
                f"s{call}",
                f"f{call}",
                query_ds,
                train_ds,
                per_device_query_batch_size=query_batch_size,
                per_device_train_batch_size=train_batch_size,
                score_args=ScoreArguments(damping_factor=damping_factor),
                overwrite_output_dir=True,
            )
            t2 = time.perf_counter()
            timings[call] = {"factors_s": t1 - t0, "scores_s": t2 - t1, "total_s": t2 - t0}
            scores = analyzer.load_pairwise_scores(f"s{call}")["all_modules"].numpy()
        if strategy == "ekfac":
            lam = analyzer.load_lambda_matrices(f"f{calls}")
            for name, matrix in lam["lambda_matrix"].items():
                n = float(lam["num_lambda_processed"][name])
                lambda_means[name] = float(matrix.double().mean()) / n
    return timings, scores, lambda_means
