"""Issue 27 end to end (integration tier: the command line on the tiny config, 8 fake devices).

One clean run is shared; against it: a run on the user's own data without eval tasks (and a
reference set equal to a training domain) exits 0; a bad mesh or learning rate exits 2 before the
workdir exists; a full disk and Ctrl-C mid-run end with one line (2, 130) and the rerun's outputs
equal the clean run's; a finished workdir rerun with fewer rounds, or with an edited artifact,
exits 2 and changes nothing.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--config.progress=false", "--config.export.final_model=false"]


def _cli(workdir, *flags, prefix=(), timeout=400):
    return subprocess.run(
        [sys.executable, *prefix, "--config", "configs/tiny.py", "--workdir", str(workdir)]
        + QUIET
        + list(flags),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


MAIN = ["-m", "ideal_jax.main"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clean") / "run"
    proc = _cli(workdir, prefix=MAIN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def _same_outputs(a, b):
    for rel in ("final_mixture.jsonl", "round_0/eval.json", "round_1/eval.json"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for rel, key in (("round_0/influence.json", "matrix"), ("round_1/mixture.json", "domains")):
        assert json.loads((a / rel).read_text())[key] == json.loads((b / rel).read_text())[key]


def test_own_data_without_eval_tasks_exits_0(clean, tmp_path):
    """Domains and tokenizer from files, the reference set = one training domain's file, no eval
    tasks: IndexError in summary.format_table (exit 1) after every artifact was written."""
    demo = clean / "demo_data"
    config = tmp_path / "own.py"
    config.write_text(
        "from configs import tiny\n\n\n"
        "def get_config(arg=None):\n"
        "    cfg = tiny.get_config()\n"
        "    cfg.unlock()\n"
        "    cfg.data.demo = False\n"
        "    cfg.eval.demo = False\n"
        f"    train = '{demo}/train/'\n"
        "    cfg.data.domains = {n: train + n + '.jsonl' for n in ('sort', 'reverse')}\n"
        f"    cfg.data.reference = {{'sort': '{demo}/train/sort.jsonl'}}\n"
        f"    cfg.data.tokenizer = '{demo}/tokenizer'\n"
        "    return cfg.lock()\n"
    )
    workdir = tmp_path / "own"
    proc = subprocess.run(
        [sys.executable, *MAIN, "--config", str(config), "--workdir", str(workdir), *QUIET],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no evaluation scores" in proc.stdout and "Traceback" not in proc.stderr
    assert (workdir / "final_mixture.jsonl").stat().st_size > 0


@pytest.mark.parametrize(
    "flag, field",
    [("--config.mesh.data=3", "mesh.data"), ("--config.train.learning_rate=-0.001", "learning")],
)
def test_bad_config_exits_2_before_the_workdir(tmp_path, flag, field):
    workdir = tmp_path / "run"
    proc = _cli(workdir, flag, prefix=MAIN, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], lines
    assert not workdir.exists()


# The full disk, injected where a real one fails an artifact: json.dump inside the atomic writer
# of round_0/influence.json (write_json_atomic must remove its partial file).
DISK_FULL = """
import errno, json, sys, types
from absl import app
from ideal_jax import main
from ideal_jax.utils import atomic

def dump(obj, f, **kw):
    if f.name.split(".tmp.")[0].endswith("round_0/influence.json"):
        f.write('{"partial')
        raise OSError(errno.ENOSPC, "No space left on device", f.name)
    return json.dump(obj, f, **kw)

atomic.json = types.SimpleNamespace(
    **{k: getattr(json, k) for k in ("load", "loads", "dumps", "JSONDecodeError")}, dump=dump
)
sys.argv[0] = "ideal_jax.main"
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.slow  # ~2-4 min of whole runs; unit: tests/test_user_data_faults.py
def test_disk_full_ends_with_one_line_and_the_rerun_is_exact(clean, tmp_path):
    workdir = tmp_path / "run"
    proc = _cli(workdir, prefix=["-c", DISK_FULL])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = _last_line(proc)
    assert line.startswith(f"error: file {workdir}/round_0/influence.json.tmp."), line
    assert "no space left" in line
    assert not [f for f in os.listdir(workdir / "round_0") if ".tmp." in f]
    again = _cli(workdir, prefix=MAIN)
    assert again.returncode == 0, again.stderr[-3000:]
    _same_outputs(clean, workdir)


@pytest.mark.slow  # ~2-4 min of whole runs; unit: tests/test_user_data_faults.py
def test_ctrl_c_ends_with_one_line_and_the_rerun_is_exact(clean, tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, *MAIN, "--config", "configs/tiny.py", "--workdir", str(workdir), *QUIET],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in proc.stderr:  # interrupt once round 0's influence stage has started
        seen.append(line)
        if "round 0 influence" in line and "start" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted (Ctrl-C)")
    again = _cli(workdir, prefix=MAIN)
    assert again.returncode == 0, again.stderr[-3000:]
    _same_outputs(clean, workdir)


def _copy(clean, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(clean, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def test_finished_workdir_with_fewer_rounds_is_refused(clean, tmp_path):
    workdir = _copy(clean, tmp_path)
    before = {p: (workdir / p).read_bytes() for p in ("final_mixture.jsonl", "summary.json")}
    proc = _cli(workdir, "--config.rounds=0", prefix=MAIN, timeout=120)
    assert proc.returncode == 2 and "'rounds'" in _last_line(proc), proc.stderr[-3000:]
    assert {p: (workdir / p).read_bytes() for p in before} == before


def test_finished_workdir_with_an_edited_artifact_is_refused(clean, tmp_path):
    workdir = _copy(clean, tmp_path)
    path = workdir / "round_0" / "influence.json"
    influence = json.loads(path.read_text())
    influence["matrix"] = [[-x for x in row] for row in influence["matrix"]]
    path.write_text(json.dumps(influence))
    proc = _cli(workdir, prefix=MAIN, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "round_0/influence.json was modified" in _last_line(proc)
