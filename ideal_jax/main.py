"""Command line: python -m ideal_jax.main --config configs/NAME.py[:ARG] --workdir DIR


The config's `mode` picks the job:
  ideal      the full loop (train → curvature → influence → reweight → evaluate, `rounds` times)
  sft        train and evaluate on the given mixture (round_0 only)
  influence  α for the model in cfg.model as it is (no training) on the given mixture
  eval       evaluate cfg.model on cfg.eval's tasks → DIR/eval.json
  daar       diversity-as-reward selection from an unlabeled pool (cfg.daar)
  export     round cfg.export.round's trained model → DIR/round_K/hf_model/ (Hugging Face format)
  compare    IDEAL against D0, uniform, best random, RegMix and DoReMi at equal volume, paired
             over cfg.seeds seeds → DIR/comparison.json, DIR/comparison.png (ideal_jax/compare)
ideal and sft runs also write the last round's model to DIR/final_model/ (cfg.export.final_model).
Rerunning the same command on an existing DIR resumes where it stopped. Bad input exits with
status 2 and a one-line message naming the file, record and field; nothing already written is
touched. A bad config (unknown field, ill-typed or out-of-range value, a mesh or batch that does
not fit this machine's devices, a path that does not exist) is refused before DIR is created. A
full disk also exits 2 with one line (the path, what failed to fit); Ctrl-C exits 130; both
resume exactly when rerun. A rerun of an existing DIR is refused (exit 2) when an artifact was
edited since it was written (every one is listed) or when it asks for fewer rounds than DIR
holds. Everything else is a bug and stays a traceback (`report_error` decides, in one place).
`--config configs/NAME.py` also works outside the repository: a path that does not exist
relative to the current directory is looked up in the installed `configs` package.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from ideal_jax.configlib.fields import flat_fields
from ideal_jax.configlib.loading import resolve_config_path
from ideal_jax.configlib.machine import check_machine, check_paths
from ideal_jax.configlib.workdir import prepare_workdir
from ideal_jax.utils import progress, workdir_lock
from ideal_jax.utils.errors import InputError, describe_machine_error

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all artifacts of the run.")
flags.mark_flags_as_required(["config", "workdir"])
MODES = ("ideal", "sft", "influence", "eval", "daar", "export", "compare")


def check_config(cfg) -> None:
    """Every check a config gets before its workdir is created: fields and their ranges, the
    paths it names, and the mesh and batch against this machine's devices (InputError naming
    the field)."""
    import jax

    from ideal_jax import stages
    from ideal_jax.curvature import trained

    stages.load(cfg)
    check_paths(cfg)
    trained.check_config(cfg)  # train.finetuning's fields against the model's layers
    check_machine(cfg, jax.device_count(), jax.process_count())


def default_fields() -> dict:
    """Every field's default (configs/common.py base_config), flat; {} if configs is absent.
    The entry point passes them to the workdir guard: a field added to the package since a run
    was made does not refuse its workdir at its default (the library never imports configs/)."""
    try:
        from configs import common
    except ImportError:
        return {}
    return flat_fields(common.base_config())


def _holding_workdir_lock(fn):
    """One run per workdir: a second one exits 2 naming the holder (utils/workdir_lock.py)."""

    @functools.wraps(fn)
    def wrapper(cfg, workdir: str) -> dict:

        check_config(cfg)  # a bad config writes nothing, not even the lock's DIR
        with workdir_lock.hold(workdir):
            return fn(cfg, workdir)

    return wrapper


@_holding_workdir_lock
def run(cfg, workdir: str) -> dict:
    """Run the job `cfg.mode` in `workdir` (the function behind the command line)."""
    from ideal_jax import export, provenance

    progress.configure(enabled=cfg.progress)
    if os.path.isdir(workdir):  # a rerun reuses and reports only artifacts as they were written
        provenance.check_unmodified(workdir)
    if cfg.mode == "export":  # reads the run's own config.json; writes only DIR/round_K/hf_model
        return export.run_export(cfg, workdir)
    export.export_settings(cfg)  # (the config itself was checked before the lock was taken)
    from ideal_jax import ideal, summary

    several_seeds = cfg.mode == "ideal" and cfg.seeds > 1
    if cfg.mode == "ideal" and not several_seeds:  # before config.json takes the new rounds
        provenance.check_extent(workdir, cfg.rounds)  # fewer rounds than DIR holds: refused
    prepare_workdir(cfg, workdir, defaults=default_fields())
    if cfg.mode == "compare":
        from ideal_jax.compare import run as compare

        return compare.run_compare(cfg, workdir)
    if several_seeds:
        return ideal.run_seeds(cfg, workdir, run)
    if cfg.mode == "ideal":
        result = ideal.run_ideal(cfg, workdir)
        export.export_final(cfg, workdir)
        print(summary.format_table(result["scores"], result.get("reference_loss")))
        return result
    if cfg.mode == "sft":
        result = ideal.run_sft(cfg, workdir)
        export.export_final(cfg, workdir)
        return result
    if cfg.mode == "influence":
        return ideal.run_influence(cfg, workdir)
    if cfg.mode == "eval":
        return ideal.run_eval_only(cfg, workdir)
    from ideal_jax.daar import job as daar_job

    return daar_job.run_from_config(cfg, workdir)


def _bad_input(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


INTERRUPTED = 130  # the shell's status for a run stopped by Ctrl-C (128 + SIGINT)
_hard_exit = os._exit  # replaced in tests


def report_error(error: BaseException, workdir: str | None) -> tuple[int, str] | None:
    """The one place where an exception becomes the command line's last line: (exit status,
    message) for bad user input (an InputError anywhere in the chain: 2), a fault of the machine
    (a full disk, a directory it may not write: 2, utils/errors.py) and Ctrl-C (130); None for
    everything else, which stays a traceback (bugs must stay visible)."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED, (
            "interrupted (Ctrl-C); rerun the same command to resume from the last finished step"
        )
    if not isinstance(error, Exception):  # SystemExit, GeneratorExit
        return None
    inputs = [e for e in _error_chain(error) if isinstance(e, InputError)]
    if inputs:
        return 2, str(inputs[0])
    machine = describe_machine_error(error, workdir)
    return None if machine is None else (2, machine)


def command(cfg, workdir: str) -> None:
    """The job behind the command line, its outcome reported as one line: stdout's status line,
    or stderr's `error: ...` and the exit status of `report_error`."""
    from ideal_jax.utils import distributed

    try:
        from ideal_jax import stages

        stages.load(cfg)  # before any work, before DIR exists
        distributed.maybe_initialize()
        run(cfg, workdir)
    except BaseException as e:
        outcome = report_error(e, workdir)
        if outcome is None:
            raise
        status, message = outcome
        print(f"error: {message}", file=sys.stderr)
        if isinstance(e, InputError):
            sys.exit(status)
        # A full disk or Ctrl-C leaves orbax's background writers behind: without a hard exit
        # their failures print pages of tracebacks after this line, at interpreter shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        _hard_exit(status)
    print(json.dumps({"workdir": workdir, "status": "done"}))


def main(argv):
    if len(argv) > 1:
        _bad_input(f"unexpected arguments: {' '.join(argv[1:])}")
    # Stage start/end lines (ideal_jax's own INFO logs) and progress bars carry the run's story;
    # other libraries' INFO logs (orbax, XLA) would drown them.
    progress.show_own_info_logs()
    command(_CONFIG.value, _WORKDIR.value)


# --- flag parsing: config paths from any directory; bad config input as one line, exit 2 ---

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=\s]+)")


def _config_argument(argv: list[str]) -> tuple[int, str] | None:
    """(index in argv, value) of the --config flag's value, or None."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return i + 1, argv[i + 1]
        for prefix in ("--config=", "-config="):
            if arg.startswith(prefix):
                return i, arg[len(prefix) :]
    return None


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def _unknown_field(cfg, path: str) -> str | None:
    """A message if the dotted `path` names no field of `cfg`, else None."""
    node, parents = cfg, []
    for name in path.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else None
        if keys is None or name not in keys:
            if keys is None:
                return f"{'.'.join(parents)} is a {type(node).__name__}, not a section"
            section = f"{'.'.join(parents)}.*" if parents else "top-level"
            near = difflib.get_close_matches(name, keys, n=1)
            hint = f" (did you mean {'.'.join([*parents, near[0]])}?)" if near else ""
            allowed = ", ".join(sorted(keys)) or "none (set them in the config file)"
            return f"unknown field{hint}; {section} fields: {allowed}"
        node, parents = node[name], [*parents, name]
    return None


def describe_flag_error(error: Exception, argv: list[str]) -> str:
    """One line for an error raised while parsing the command line's flags."""
    chain = _error_chain(error)
    input_errors = [e for e in chain if isinstance(e, InputError)]
    if input_errors:  # raised by the config file (e.g. configs/common.py apply_overrides)
        return str(input_errors[-1])
    overrides = [m.group(1) for a in argv if (m := _OVERRIDE.match(a))]
    found = _config_argument(argv)
    cfg = None
    if overrides and found is not None:
        try:
            cfg = flags.FLAGS["config"].parser.parse(found[1])
        except Exception:  # the config itself does not load: report the original error below
            cfg = None
    if cfg is not None:
        for path in overrides:
            if (problem := _unknown_field(cfg, path)) is not None:
                return str(InputError(problem, field=path))
        message = str(error)
        for path in overrides:
            if message.startswith(f"flag --config.{path}="):
                value = message[len(f"flag --config.{path}=") :].split(": ", 1)[0]
                current = cfg
                for name in path.split("."):
                    current = current[name]
                expected = type(current).__name__
                return str(InputError(f"expected a {expected}, got {value!r}", field=path))
    root = chain[-1]
    if isinstance(root, OSError) and root.strerror and found is not None:
        return f"--config: cannot load {found[1].partition(':')[0]}: {root.strerror}"
    if root is not error and not isinstance(root, flags.Error):
        return f"--config: {type(root).__name__}: {' '.join(str(root).split())}"
    return " ".join(str(error).strip().splitlines()[0].split())


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with bad input reported as `error: ...` (exit status 2)."""
    argv = list(argv)
    found = _config_argument(argv)
    if found is not None:
        index, value = found
        resolved = resolve_config_path(value)
        argv[index] = argv[index][: len(argv[index]) - len(value)] + resolved
    try:
        rest = flags.FLAGS(argv)
        _ = _CONFIG.value.to_dict()  # a config file that failed to load raises here
    except Exception as e:
        _bad_input(describe_flag_error(e, argv))
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
