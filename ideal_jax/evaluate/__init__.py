"""Capability evaluation: scorers, a sandbox for generated code, benchmark loaders and a runner."""

from ideal_jax.evaluate.runner import evaluate_tasks, paper_average, write_eval_json

__all__ = ["evaluate_tasks", "paper_average", "write_eval_json"]
