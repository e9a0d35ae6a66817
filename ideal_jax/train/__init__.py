"""Supervised fine-tuning: TrainState and optimizer (state), the pure jitted step (step), orbax
checkpoints (checkpoint), metrics.jsonl / TensorBoard (metrics) and the resumable loop (loop)."""

from ideal_jax.train.checkpoint import Checkpointer
from ideal_jax.train.loop import NonFiniteLossError, run_sft
from ideal_jax.train.state import (
    TrainState,
    abstract_train_state,
    init_train_state,
    make_optimizer,
    state_shardings,
)
from ideal_jax.train.step import eval_step, make_eval_step, make_train_step, train_step

__all__ = [
    "Checkpointer",
    "NonFiniteLossError",
    "TrainState",
    "abstract_train_state",
    "eval_step",
    "init_train_state",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "run_sft",
    "state_shardings",
    "train_step",
]
