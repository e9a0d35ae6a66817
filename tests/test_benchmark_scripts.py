"""Benchmarks are code too: every benchmarks/*.py imports and parses its command line.

Each script runs in this process as `python benchmarks/NAME.py --help` would run it (runpy, as
__main__, with sys.argv set): its module body executes (so a moved or renamed import fails
here, naming the script) and its `if __name__ == "__main__":` entry point reaches argparse,
which prints the usage and exits 0 before any work starts. The scripts are found with a glob,
so a new one is covered without editing this file. What a script changes in the process on the
way (sys.path, os.environ, sys.argv) is put back after it.
"""

import glob
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in SCRIPTS]


def test_the_glob_finds_the_benchmarks():
    assert "demo_volume_curves" in NAMES and "bench_vs_kronfluence" in NAMES, NAMES


@pytest.fixture
def restored_environ():
    """os.environ as it was before the test (scripts setdefault HF_HUB_OFFLINE and the like)."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.mark.parametrize("path", SCRIPTS, ids=NAMES)
def test_benchmark_imports_and_parses_help(path, monkeypatch, capsys, restored_environ):
    name = os.path.basename(path)
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None), f"{name} --help exited {exit_info.value.code}"
    # The exit came from argparse's --help, not from something before the parser (a script that
    # gives up at import time when an optional package is missing would exit 0 too).
    assert out.startswith(f"usage: {name}"), f"{name} --help printed no usage:\n{out[:500]}"
