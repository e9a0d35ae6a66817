"""Every third-party module the code imports is declared in setup.py (a fresh install runs).

The package (`ideal_jax/`, `configs/`) must run on `install_requires` alone, except for optional
features declared as their own extra (e.g. `gguf`); tests, benchmarks and the notebook may also use
the `test` extra. Imports are read with `ast` (all absolute imports,
including those inside functions, plus `pytest.importorskip("name")`), mapped to distributions with
`importlib.metadata.packages_distributions()`, and compared with the lists parsed from setup.py.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = {"ideal_jax", "configs", "benchmarks"}

# Needed at run time although nothing imports them directly; each must stay declared.
RUNTIME_EXTRAS = {
    # transformers' `apply_chat_template` (the chat formatting of every record) raises
    # "ImportError: apply_chat_template requires jinja2" without it.
    "jinja2": "install_requires",
    # tests/test_model_parity.py compares logits with transformers' PyTorch models (importorskip).
    "torch": "test",
    # tests/test_notebook.py runs the notebook on the python3 kernel that ipykernel provides.
    "ipykernel": "test",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(spec: str) -> str:
    return _normalise(re.split(r"[\s<>=!~;\[@]", spec.strip(), maxsplit=1)[0])


def _setup_requirements() -> tuple[set[str], set[str], set[str]]:
    """(install_requires, extras_require["test"], the other extras) of setup.py, normalised."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"
    )
    kwargs = {
        k.arg: ast.literal_eval(k.value)
        for k in call.keywords
        if k.arg in ("install_requires", "extras_require")
    }
    install = {_requirement_name(s) for s in kwargs["install_requires"]}
    extras = kwargs.get("extras_require", {})
    test = {_requirement_name(s) for s in extras.get("test", [])}
    optional = {_requirement_name(s) for k, v in extras.items() if k != "test" for s in v}
    return install, test, optional


def _python_files(*dirs: str):
    for d in dirs:
        for base, _, files in os.walk(os.path.join(ROOT, d)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.join(base, name)


def _imported_modules(*dirs: str) -> dict[str, str]:
    """Top-level third-party module name -> first file importing it."""
    local = {os.path.splitext(os.path.basename(p))[0] for p in _python_files(*dirs)}
    found: dict[str, str] = {}
    for path in _python_files(*dirs):
        tree = ast.parse(open(path).read(), filename=path)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "importorskip"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in OWN or top in local:
                    continue
                found.setdefault(top, os.path.relpath(path, ROOT))
    return found


def _undeclared(modules: dict[str, str], declared: set[str]) -> list[str]:
    dists = importlib.metadata.packages_distributions()
    problems = []
    for module, path in sorted(modules.items()):
        if module not in dists:
            problems.append(f"{module} (imported by {path}) is not installed here")
            continue
        names = {_normalise(d) for d in dists[module]}
        if not names & declared:
            problems.append(f"{module} (imported by {path}; distribution {sorted(names)[0]})")
    return problems


# Imported lazily by one package module that reports its absence (no other module needs it);
# declared in the "bench" extra, installed by hand with --no-deps (so not necessarily here).
OPTIONAL_PACKAGE_MODULES = {"kronfluence": "ideal_jax/influence/kronfluence_ref.py"}


def test_package_imports_are_install_requires():
    install, _, optional = _setup_requirements()
    modules = _imported_modules("ideal_jax", "configs")
    assert {"jax", "transformers", "pyarrow", "ml_dtypes", "tokenizers"} <= set(modules)
    for module, path in OPTIONAL_PACKAGE_MODULES.items():
        assert _normalise(module) in optional, f"{module} ({path}) must be in an extra of setup.py"
        assert modules.pop(module, path) == path, f"{module} is imported outside {path}"
    problems = _undeclared(modules, install | optional)
    assert not problems, "imported but not in setup.py install_requires: " + "; ".join(problems)


# Imported only inside a try/except by a benchmark that skips cleanly without it; declared in the
# "bench" extra (installed by hand with --no-deps, so not necessarily present here).
OPTIONAL_BENCHMARK_MODULES = {
    "kronfluence": {"benchmarks/bench_vs_kronfluence.py", "benchmarks/profile_influence_passes.py"}
}


def _files_importing(module: str, *dirs: str) -> set[str]:
    """Every file under `dirs` that imports `module` (or a submodule of it)."""
    out = set()
    for path in _python_files(*dirs):
        for node in ast.walk(ast.parse(open(path).read(), filename=path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if any(n.split(".")[0] == module for n in names):
                out.add(os.path.relpath(path, ROOT))
    return out


def test_test_and_benchmark_imports_are_declared():
    install, test, optional = _setup_requirements()
    modules = _imported_modules("tests", "benchmarks", "notebooks")
    if importlib.util.find_spec("torch") is None:  # gated by importorskip; declared below
        modules.pop("torch", None)
    for module, paths in OPTIONAL_BENCHMARK_MODULES.items():
        assert _normalise(module) in optional, f"{module} ({paths}) must be in an extra of setup.py"
        outside = _files_importing(module, "tests", "benchmarks", "notebooks") - paths
        assert not outside, f"{module} is imported outside {sorted(paths)}: {sorted(outside)}"
        modules.pop(module, None)
    problems = _undeclared(modules, install | test)
    assert not problems, "imported but not in install_requires or the test extra: " + "; ".join(
        problems
    )


@pytest.mark.parametrize("dist, where", sorted(RUNTIME_EXTRAS.items()))
def test_runtime_only_dependencies_are_declared(dist, where):
    install, test, _ = _setup_requirements()
    assert _normalise(dist) in (install if where == "install_requires" else test), dist
