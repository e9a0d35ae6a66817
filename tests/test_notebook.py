"""notebooks/quickstart: the .ipynb matches its jupytext source, and it runs end to end."""

import json
import os
import sys

import ipykernel  # noqa: F401  (the kernel below runs ipykernel on this interpreter)
import jupytext
import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "notebooks", "quickstart.py")
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_ipynb_is_in_sync_with_the_py_source():
    py = jupytext.read(SOURCE)
    ipynb = jupytext.read(NOTEBOOK)
    assert _cells(ipynb) == _cells(py), (
        "notebooks/quickstart.ipynb is stale: jupytext --to ipynb notebooks/quickstart.py"
    )
    for cell in ipynb.cells:  # committed without outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def _kernel_env(workdir: str) -> dict:
    env = dict(os.environ)
    # conftest fakes 8 CPU devices for the test process; the kernel runs on one (faster).
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["IDEAL_JAX_ROOT"] = ROOT
    env["IDEAL_JAX_WORKDIR"] = workdir
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def _kernel_manager(tmp_path) -> KernelManager:
    """A kernel on this very interpreter (a private kernelspec: no user-installed one is used)."""
    spec_dir = tmp_path / "kernels" / "ideal-jax-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ideal_jax test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="ideal-jax-test", kernel_spec_manager=specs)


def test_quickstart_runs_and_writes_summary(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    workdir = str(tmp_path / "run")
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=_kernel_env(workdir))  # raises CellExecutionError on any failing cell
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert os.path.getsize(os.path.join(workdir, "summary.png")) > 0
    assert os.path.exists(os.path.join(workdir, "round_1", "mixture.json"))
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1
    text = "".join(
        o.get("text", "")
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.output_type == "stream"
    )
    assert "reference \\ domain" in text and "uppercase" in text
