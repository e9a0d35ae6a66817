"""Per-device memory of the SFT step and the K-FAC curvature pass, planned without the hardware.

    python benchmarks/aot_memory.py                       # tiny on 8, Llama-3.1-8B on 8 and 64
    python benchmarks/aot_memory.py --targets tiny:8 --json out.json
    python benchmarks/aot_memory.py --targets 8b:64 --mesh64 1,64,1 --device-memory-gib 95

(with the package installed, `pip install -e .`, or `PYTHONPATH=.` from the repository root).

Each target is MODEL:DEVICES. One subprocess per device count fakes that many CPU devices
(`--xla_force_host_platform_device_count`), builds the mesh, and compiles ahead of time, on abstract
inputs only (nothing allocated), (1) the trainer's train_step and (2) one K-FAC factor update of the
first curvature layer group that `plan_curvature_layer_groups` chooses for the device memory given.
It prints XLA's per-device arguments / outputs / temporaries / total, and the layer-group plan.

Settings (per target, documented here rather than hidden): the SFT step runs the model in bf16 with
rematerialisation (how an 8B model is trained) and f32 master weights + AdamW moments; the
curvature pass runs in f32 without remat (kfac-jax's requirement, DESIGN.md). Rows per device and
the sequence length are flags. CPU stands in for GPU/TPU: arguments and outputs are exact,
temporaries an estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = {"tiny": ("tiny", 256), "1b": ("1b", 32000), "8b": ("llama3_8b", 128256)}
DEFAULT_MESHES = {1: "1,1,1", 8: "1,8,1", 64: "1,16,4"}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="tiny:8,8b:8,8b:64", help="MODEL:DEVICES, comma list")
    parser.add_argument("--mesh8", default=DEFAULT_MESHES[8], help="data,fsdp,tensor for 8")
    parser.add_argument("--mesh64", default=DEFAULT_MESHES[64], help="data,fsdp,tensor for 64")
    parser.add_argument("--rows-per-device", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tiny-seq-len", type=int, default=128)
    parser.add_argument("--device-memory-gib", type=float, default=80.0, help="H100: 80")
    parser.add_argument("--layers", default="mlp", help="curvature layer preset or regex")
    parser.add_argument("--skip", default="", help="comma list of programs to skip: train,kfac")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--devices", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _mesh_shape(args: argparse.Namespace, devices: int) -> tuple[int, ...]:
    text = {8: args.mesh8, 64: args.mesh64}.get(
        devices, DEFAULT_MESHES.get(devices, f"{devices},1,1")
    )
    return tuple(int(x) for x in text.split(","))


def _worker(args: argparse.Namespace) -> None:
    """Runs in the subprocess: every target of one device count; one JSON line per program."""
    import jax

    from configs import common
    from ideal_jax import sharding
    from ideal_jax.curvature import memory_plan
    from ideal_jax.model.config import preset

    models = [
        t.split(":")[0] for t in args.targets.split(",") if int(t.split(":")[1]) == args.devices
    ]
    skip = set(filter(None, args.skip.split(",")))
    mesh = sharding.make_mesh(_mesh_shape(args, args.devices))
    # Optimizer hyper-parameters do not change memory: the common settings build AdamW.
    train_cfg = common.base_config().train
    device_memory = int(args.device_memory_gib * memory_plan.GiB)
    for name in models:
        preset_name, vocab = MODELS[name]
        cfg = preset(preset_name, vocab)
        seq_len = args.tiny_seq_len if name == "tiny" else args.seq_len
        batch = args.rows_per_device * sharding.batch_divisor(mesh)
        if name != "tiny":  # train big models the way they are trained: bf16 compute, remat
            cfg = cfg.replace(dtype="bfloat16", remat=True)
        groups = memory_plan.plan_curvature_layer_groups(cfg, args.layers, mesh, device_memory)
        base = {
            "model": name,
            "devices": args.devices,
            "mesh": dict(mesh.shape),
            "batch": batch,
            "seq_len": seq_len,
            "layer_groups": [len(g) for g in groups],
        }
        programs = {
            "train": lambda cfg=cfg, seq_len=seq_len, batch=batch: memory_plan.compile_train_step(
                cfg, train_cfg, mesh, batch_size=batch, seq_len=seq_len
            ),
            "kfac": lambda cfg=cfg, seq_len=seq_len, batch=batch, g=groups[0]: (
                memory_plan.compile_curvature_pass(cfg, mesh, g, batch_size=batch, seq_len=seq_len)
            ),
        }
        for program, build in programs.items():
            if program in skip:
                continue
            t0 = time.perf_counter()
            compiled = build()
            label = f"{name} {program}" + (
                f" (group 1/{len(groups)}: {len(groups[0])} layers)" if program == "kfac" else ""
            )
            report = memory_plan.report_from_compiled(label, compiled, mesh)
            row = {
                **base,
                "program": program,
                **report.to_dict(),
                "compile_s": round(time.perf_counter() - t0, 1),
            }
            print("ROW " + json.dumps(row), flush=True)
            del compiled
            jax.clear_caches()


def main(argv: list[str]) -> None:
    args = _parse(argv)
    sys.path.insert(0, _repo_root())  # run from a checkout without installing
    if args.devices is not None:
        _worker(args)
        return
    counts = sorted({int(t.split(":")[1]) for t in args.targets.split(",")})
    rows = []
    for count in counts:
        env = dict(os.environ)
        # Compilation only: cheap LLVM codegen; buffer assignment (what we read) is HLO-level.
        env["XLA_FLAGS"] = (
            f"--xla_force_host_platform_device_count={count} "
            "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        )
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_repo_root(), env.get("PYTHONPATH")]))
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--devices", str(count)]
        # Stream the worker's rows as they come: an 8B compile takes minutes per program.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
                r = rows[-1]
                print(
                    f"  compiled {r['name']} on {count} devices in {r['compile_s']} s",
                    file=sys.stderr,
                    flush=True,
                )
        if proc.wait():
            raise SystemExit(f"worker for {count} devices failed (exit {proc.returncode})")
    _print(rows, args.device_memory_gib)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _print(rows: list[dict], device_memory_gib: float) -> None:
    from ideal_jax.curvature.memory_plan import MemoryReport, format_table

    reports = [
        MemoryReport(
            r["name"],
            r["mesh"],
            r["argument_bytes"],
            r["output_bytes"],
            r["temp_bytes"],
            r["alias_bytes"],
        )
        for r in rows
    ]
    print(format_table(reports))
    for r in rows:
        if r["program"] == "kfac":
            print(
                f"{r['model']} on {r['devices']} devices ({device_memory_gib:g} GiB each): "
                f"curvature layer groups {r['layer_groups']}; "
                f"batch {r['batch']} x {r['seq_len']} tokens; compile {r['compile_s']} s"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
