"""Command line: python -m ideal_jax.main --config configs/NAME.py[:ARG] --workdir DIR


The config's `mode` picks the job:
  ideal      the full loop (train → curvature → influence → reweight → evaluate, `rounds` times)
  sft        train and evaluate on the given mixture (round_0 only)
  influence  α for the model in cfg.model as it is (no training) on the given mixture
  eval       evaluate cfg.model on cfg.eval's tasks → DIR/eval.json
  daar       diversity-as-reward selection from an unlabeled pool (cfg.daar)
Rerunning the same command on an existing DIR resumes where it stopped. Bad input exits with
status 2 and a message naming the file, record and field; nothing already written is touched.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ideal_jax.utils.errors import InputError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all artifacts of the run.")
flags.mark_flags_as_required(["config", "workdir"])
MODES = ("ideal", "sft", "influence", "eval", "daar")


def run(cfg, workdir: str) -> dict:
    """Run the job `cfg.mode` in `workdir` (the function behind the command line)."""
    from ideal_jax import configlib, ideal, stages, summary

    if cfg.mode not in MODES:
        raise InputError(f"unknown mode {cfg.mode!r}; one of {', '.join(MODES)}", field="mode")
    if cfg.mode == "ideal" and cfg.seeds > 1:
        configlib.prepare_workdir(cfg, workdir)
        results = []
        for s in range(cfg.seeds):
            seed_cfg = type(cfg)(cfg.to_dict())  # an unlocked copy
            seed_cfg.seed, seed_cfg.seeds, seed_cfg.train.seed = cfg.seed + s, 1, cfg.train.seed + s
            results.append(run(seed_cfg.lock(), os.path.join(workdir, f"seed_{cfg.seed + s}")))
        agg = summary.aggregate_seeds(results)
        stages.write_json(os.path.join(workdir, "summary_seeds.json"), agg)
        print(summary.format_table(agg["scores"]))
        return agg
    configlib.prepare_workdir(cfg, workdir)
    if cfg.mode == "ideal":
        result = ideal.run_ideal(cfg, workdir)
        print(summary.format_table(result["scores"]))
        return result
    if cfg.mode == "sft":
        return ideal.run_ideal(cfg, workdir, rounds=0)
    if cfg.mode == "influence":
        return ideal.run_ideal(cfg, workdir, rounds=0, train=False, influence_last=True)
    if cfg.mode == "eval":
        return ideal.run_eval_only(cfg, workdir)
    from ideal_jax.daar import job as daar_job

    return daar_job.run_from_config(cfg, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ideal_jax.utils import distributed

    # Progress bars carry the run's story; library INFO logs (orbax, XLA) drown them.
    logging.set_verbosity(logging.WARNING)
    distributed.maybe_initialize()
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except InputError as e:
        logging.error("bad input: %s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"workdir": _WORKDIR.value, "status": "done"}))


if __name__ == "__main__":
    app.run(main)
