"""Imports go one way, in the pipeline order of docs/architecture.md: a module may import from its
own component or from an earlier layer, never from a later one (lazy imports included)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ideal_jax")

# Components of ideal_jax (first name under the package), earliest first; one set per layer.
LAYERS = [
    {"utils", "compat", "configlib", "sharding", "stats", "provenance", "artifacts"},
    {"model"},
    {"data"},
    {"train"},
    {"curvature"},
    {"influence"},
    {"reweight", "step_policy", "step_agreement"},
    {"evaluate"},
    {"daar"},
    {"summary"},
    {"round"},
    {"ideal", "export", "analyze"},
    {"compare"},
    {"stages"},
    {"main"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _component(path: str) -> str:
    rel = os.path.relpath(path, PACKAGE)
    return rel.split(os.sep)[0].removesuffix(".py")


def _imported_components(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "ideal_jax":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:  # from ideal_jax import a, b
                out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "ideal_jax" and len(parts) > 1:
                    out.add(parts[1])
    return out


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def test_every_component_has_a_layer():
    components = {_component(p) for p in _modules()} - {"__init__"}
    assert components <= set(LAYER), sorted(components - set(LAYER))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: os.path.relpath(p, PACKAGE))
def test_imports_go_one_way(path):
    me = _component(path)
    if me == "__init__":
        return
    with open(path) as f:
        tree = ast.parse(f.read())
    later = sorted(c for c in _imported_components(tree) if c in LAYER and LAYER[c] > LAYER[me])
    assert not later, f"{os.path.relpath(path, PACKAGE)} ({me}) imports later layers: {later}"
