"""One process of the multi-process test (tests/test_multiprocess.py); also its 1-process reference.

Run as `python tests/multiprocess_worker.py --workdir DIR --local-devices N`. When the explicit
coordinator variables are set (IDEAL_JAX_COORDINATOR, IDEAL_JAX_NUM_PROCESSES,
IDEAL_JAX_PROCESS_ID, IDEAL_JAX_CPU_COLLECTIVES=1) the process joins a JAX distributed system over
gloo through `ideal_jax.utils.distributed.maybe_initialize`, exactly as a cluster launch would.

What it does, all with the library's own entry points:
  1. builds a synthetic 3-domain SFT set and a 2-capability reference set (identical on every
     host), and keeps only this host's rows of every global batch (`iterate_batches` with
     host_index / host_count);
  2. `run_sft` for a few steps on a (data=2, fsdp=2) mesh: the workdir is shared, orbax writes the
     checkpoint cooperatively and only process 0 writes metrics.jsonl;
  3. one influence pass on the trained parameters: K-FAC factors (kfac-jax), domain and reference
     mean gradients, the α matrix with the K-FAC inverse.
The lead process writes DIR/results.npz (losses, gathered parameters and factors, α); every process
writes DIR/process_<i>.json describing what it saw (its rows per batch, devices, process count).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

STEPS = 4
BATCH_SIZE = 8  # global rows per step; each of 2 hosts loads 4
SEQ_LEN = 24
DOMAINS = ("code", "math", "chat")
CAPABILITIES = ("reasoning", "coding")
VOCAB = 64
_T0 = time.perf_counter()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--local-devices", type=int, default=2)
    return parser.parse_args(argv)


def synthetic_examples(names: tuple[str, ...], per_group: int, seed: int) -> list[Any]:
    """Random token sequences; the second half of each is the response (loss-masked in)."""
    import numpy as np

    from ideal_jax.data.formatting import TokenizedExample

    rng = np.random.default_rng(seed)
    out = []
    for g, name in enumerate(names):
        for i in range(per_group):
            length = int(rng.integers(6, 15))
            # Each group draws from its own token range so domain gradients differ visibly.
            ids = rng.integers(1 + 8 * g, 1 + 8 * g + 24, size=length).astype(np.int32)
            mask = np.zeros(length, bool)
            mask[length // 2 :] = True
            out.append(TokenizedExample(ids, mask, f"{name}-{i}", name))
    return out


def _log(message: str) -> None:
    """Stage marks with elapsed seconds on stderr: the test prints them when something fails."""
    print(
        f"[worker {os.environ.get('IDEAL_JAX_PROCESS_ID', '0')} "
        f"{time.perf_counter() - _T0:6.1f}s] {message}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str]) -> None:
    args = _parse(argv)
    # Must precede the first jax import: the fake CPU device count is read once. Compilation, not
    # execution, is nearly all of this test's time; cheaper LLVM optimisation halves it, and the
    # reference and the multi-process run use the same flags, so they compute the same programs.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.local_devices} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    # Run as a script from anywhere: make the repository's package importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from ideal_jax.utils import distributed

    launcher = distributed.maybe_initialize()

    import ml_collections
    import numpy as np
    from jax.experimental import multihost_utils

    from ideal_jax import sharding
    from ideal_jax.curvature import kfac as kfac_lib
    from ideal_jax.curvature import layers as layers_lib
    from ideal_jax.curvature import operators
    from ideal_jax.curvature import problem as problem_lib
    from ideal_jax.data.batching import iterate_batches, steps_per_epoch
    from ideal_jax.influence import alpha as alpha_lib
    from ideal_jax.influence import gradients
    from ideal_jax.model.config import preset
    from ideal_jax.train.loop import run_sft

    host, hosts = jax.process_index(), jax.process_count()
    # One layer of the tiny preset: every stage is exercised, and compile time (which dominates
    # this test on 2 shared cores) is half that of two layers.
    model_cfg = preset("tiny", VOCAB).replace(num_layers=1)
    mesh = sharding.make_mesh((2, 2, 1))
    train_cfg = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-3,
            warmup_steps=1,
            schedule="cosine",
            end_lr_fraction=0.1,
            weight_decay=0.01,
            b1=0.9,
            b2=0.95,
            grad_clip=1.0,
            grad_accum=1,
            batch_size=BATCH_SIZE,
            seq_len=SEQ_LEN,
            epochs=1,
            log_every=1,
            checkpoint_every=STEPS,
            keep_checkpoints=1,
            seed=0,
        )
    )
    train = synthetic_examples(DOMAINS, 16, seed=1)
    reference = synthetic_examples(CAPABILITIES, 6, seed=2)
    n_steps = min(STEPS, steps_per_epoch(train, BATCH_SIZE, SEQ_LEN, "pack", seed=0, epoch=0))
    local_rows: list[int] = []

    def batches_for_epoch(epoch: int):
        for batch in iterate_batches(
            train, BATCH_SIZE, SEQ_LEN, "pack", 0, epoch, host, hosts, domain_names=DOMAINS
        ):
            local_rows.append(int(batch["tokens"].shape[0]))
            yield batch

    _log(f"initialized ({launcher}); training {n_steps} steps")
    params, summary = run_sft(
        model_cfg,
        train_cfg,
        mesh,
        args.workdir,
        batches_for_epoch,
        n_steps,
        domain_names=DOMAINS,
        progress=False,
    )

    def global_batches(examples, names):
        """This host's rows of each global batch, assembled into global arrays on the mesh."""
        return [
            sharding.shard_batch(b, mesh)
            for b in iterate_batches(
                examples, BATCH_SIZE, SEQ_LEN, "pack", 0, 0, host, hosts, domain_names=names
            )
        ]

    _log(f"trained; influence pass ({summary})")
    with jax.set_mesh(mesh):
        train_batches = global_batches(train, DOMAINS)
        ref_batches = global_batches(reference, CAPABILITIES)
        layers = layers_lib.select_layers(params, "mlp")
        problem = problem_lib.lm_problem(model_cfg, layers)
        curvature = kfac_lib.KfacCurvature(problem, "empirical")
        state = kfac_lib.accumulate_factors(curvature, params, train_batches, jax.random.key(0))
        _log("factors done")
        dom = gradients.group_mean_gradients(problem, params, train_batches, DOMAINS)
        ref = gradients.group_mean_gradients(problem, params, ref_batches, CAPABILITIES)
        _log("gradients done")
        inverse = operators.build_operator(
            "kfac",
            problem=problem,
            params=params,
            curvature=curvature,
            state=state,
            damping=0.1,
            relative_damping=True,
        )
        alpha = alpha_lib.compute_alpha(ref, dom, inverse, layers=layers)

    _log("alpha done")
    # Every process takes part in the gathers (they are collectives); only the lead writes.
    flat_params = {
        jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    gathered = multihost_utils.process_allgather(flat_params, tiled=True)
    first = state.kfac.blocks_states[0]
    factors = multihost_utils.process_allgather(
        {"A": first.factors[0].value, "G": first.factors[1].value}, tiled=True
    )
    info = {
        "launcher": launcher,
        "process_index": host,
        "process_count": hosts,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "local_rows": sorted(set(local_rows)),
        "steps": n_steps,
        "final_step": summary["final_step"],
    }
    with open(os.path.join(args.workdir, f"process_{host}.json"), "w") as f:
        json.dump(info, f)
    if distributed.is_lead_host():
        np.savez(
            os.path.join(args.workdir, "results.npz"),
            alpha=np.asarray(alpha.matrix),
            domain_weights=np.asarray(dom.weights),
            factor_A=np.asarray(factors["A"]),
            factor_G=np.asarray(factors["G"]),
            **{"param" + k: np.asarray(v) for k, v in gathered.items()},
        )
    # Nobody exits (tearing down the coordinator) before everyone has finished writing.
    multihost_utils.sync_global_devices("multiprocess_worker done")


if __name__ == "__main__":
    main(sys.argv[1:])
