"""Test configs: the tiny config (configs/tiny.py) with dotted fields replaced."""

from configs import tiny


def set_fields(cfg, changes: dict):
    """cfg with every {"section.field": value} of `changes` set (fields must exist)."""
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return cfg


def tiny_config(**changes):
    """configs/tiny.py without progress bars, with `changes` ({"train.seed": 1} style; dotted
    names passed as **{"a.b": v})."""
    cfg = tiny.get_config()
    cfg.progress = False
    return set_fields(cfg, changes)


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
