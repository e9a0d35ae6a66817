"""Error messages name real fields: every config field an error of the package names exists in
configs/common.py's base_config().

The package's sources (ideal_jax/**/*.py) are parsed with `ast`, never imported. Collected:

- the `field=` keyword of every call of an error class (ideal_jax/utils/errors.py's InputError
  and the package's subclasses of it): a string, an f-string's literal head (`f"daar.tau.{d}"`
  names daar.tau) or a module-level string constant;
- dotted `section.field` names in the message (first argument) of those calls and of every
  `raise SomeError(...)`, with a leading `cfg.` or `--config.` dropped;
- the fields of the choice and range tables (configlib/checks.py and the typed configs'), which
  name them through a loop variable.

Which of them are claims about the config is decided by structure, not by a list of names:

- An error that is located in a file (`path=`, `record=`, or a `**where` that carries them)
  names that file's field: a record's `messages`, a dataset_info.json key, a model's
  config.json key, a GGUF metadata key, a checkpoint's tensor. Never a config claim.
- Otherwise a `field=` name is a config claim when it is written in the config's namespace:
  its first dotted component is a top-level key of base_config() (a section such as `train`,
  or a top-level field such as `seed`). Other names are not config paths: a batch's `weights`,
  a function's `alpha`, an eval task entry's `type`, a command-line `--source`, a class's
  `CurvatureProblem.loss`.
- In message text, a dotted name is a claim when its first component is a section, unless its
  last component is a file suffix (`influence.json`, `model.safetensors` are files).

A claim holds when the dotted path resolves in base_config(); below a field whose value is a
dict (data.demo_train_sizes, daar.tau, ...) the keys are the user's, so any key there holds.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
from collections.abc import Mapping

import ml_collections
import pytest

from configs import common
from ideal_jax import reweight, step_policy
from ideal_jax.compare import config as compare_config
from ideal_jax.configlib import checks

# The choice and range tables, which name their fields through a loop variable.
TABLES = {
    "ideal_jax/configlib/checks.py CHOICES": checks.CHOICES,
    "ideal_jax/configlib/checks.py RANGES": checks.RANGES,
    "ideal_jax/reweight.py RANGES": reweight.RANGES,
    "ideal_jax/step_policy.py CHOICES": step_policy.CHOICES,
    "ideal_jax/step_policy.py RANGES": step_policy.RANGES,
    "ideal_jax/compare/config.py RANGES": compare_config.RANGES,
}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "ideal_jax")
ERRORS_MODULE = os.path.join(PACKAGE, "utils", "errors.py")

# A dotted name in a message whose last component is one of these is a file name, not a field.
FILE_SUFFIXES = frozenset(
    {"json", "jsonl", "safetensors", "gguf", "npz", "npy", "py", "txt", "csv", "png", "parquet"}
)
# Keywords that locate an error in a file: its `field` is that file's field.
LOCATING_KEYWORDS = frozenset({"path", "record"})
_DOTTED = re.compile(
    r"(?<![\w.])(?:--config\.|cfg\.)?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)",
)


@dataclasses.dataclass(frozen=True)
class Name:
    name: str
    where: str  # "ideal_jax/x.py:LINE"
    how: str  # "field=", "message", "CHOICES", ...


def _sources() -> list[str]:
    return sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True))


def _call_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def error_classes(trees: Mapping[str, ast.Module]) -> set[str]:
    """The classes of ideal_jax/utils/errors.py and every package class derived from one."""
    classes = {
        node.name for node in ast.walk(trees[ERRORS_MODULE]) if isinstance(node, ast.ClassDef)
    }
    while True:
        derived = {
            node.name
            for tree in trees.values()
            for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef)
            and any(_call_name(base) in classes for base in node.bases)
        }
        if derived <= classes:
            return classes
        classes |= derived


def _module_constants(tree: ast.Module) -> dict[str, str]:
    out = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def _literal_name(node: ast.expr, constants: Mapping[str, str]) -> str | None:
    """The field name a `field=` expression spells, as far as the source says (None: unknown)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.JoinedStr):  # the literal head: f"daar.tau.{d}" -> daar.tau
        head = ""
        for part in node.values:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                # only a head that ends between components names a field: "daar.tau." yes,
                # "train.batch" (of f"train.batch{x}") no
                return (head[:-1] or None) if head.endswith((".", "[")) else None
            head += part.value
        return head
    return None


def _message_strings(node: ast.expr) -> list[str]:
    return [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def _located(call: ast.Call) -> bool:
    return any(k.arg is None or k.arg in LOCATING_KEYWORDS for k in call.keywords)


def collect(sources: Mapping[str, str]) -> tuple[list[Name], list[Name]]:
    """(names in the config's namespace, fields of a file) that the errors in `sources`
    ({path: text}) name. The namespace is base_config()'s top-level keys."""
    cfg = common.base_config()
    top = set(cfg.keys())
    sections = {k for k in top if isinstance(cfg[k], ml_collections.ConfigDict)}
    trees = {path: ast.parse(text, path) for path, text in sources.items()}
    if ERRORS_MODULE not in trees:
        trees[ERRORS_MODULE] = ast.parse(open(ERRORS_MODULE, encoding="utf-8").read())
    classes = error_classes(trees)
    claims: list[Name] = []
    file_fields: list[Name] = []
    for path, tree in trees.items():
        rel = os.path.relpath(path, ROOT)
        constants = _module_constants(tree)
        raised = {
            id(node.exc)
            for node in ast.walk(tree)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            is_error = _call_name(node.func) in classes
            where = f"{rel}:{node.lineno}"
            if is_error:
                for keyword in node.keywords:
                    if keyword.arg != "field":
                        continue
                    name = _literal_name(keyword.value, constants)
                    if name is None:
                        continue
                    if _located(node):
                        file_fields.append(Name(name, where, "field= (located)"))
                    elif name.split(".")[0] in top:
                        claims.append(Name(name, where, "field="))
            if (is_error or id(node) in raised) and node.args:
                for text in _message_strings(node.args[0]):
                    for match in _DOTTED.finditer(text):
                        parts = match.group(1).split(".")
                        if parts[0] in sections and parts[-1] not in FILE_SUFFIXES:
                            claims.append(Name(match.group(1), where, "message"))
    return claims, file_fields


def resolves(cfg, name: str) -> bool:
    """`name` (dotted) is a field of `cfg`, or a key under a dict-valued field of it."""
    node = cfg
    for depth, part in enumerate(name.split(".")):
        if isinstance(node, ml_collections.ConfigDict | Mapping) and part in node:
            node = node[part]
            continue
        # data.demo_train_sizes.arithmetic: below a field (depth >= 2) a dict's keys are the user's
        return depth >= 2 and isinstance(node, ml_collections.ConfigDict | Mapping)
    return True


def _package() -> dict[str, str]:
    return {p: open(p, encoding="utf-8").read() for p in _sources()}


@pytest.fixture(scope="module")
def package_names():
    return collect(_package())


def test_every_config_field_an_error_names_exists(package_names):
    cfg = common.base_config()
    claims, _ = package_names
    checked = [
        *claims,
        *(Name(k, where, "a table") for where, table in TABLES.items() for k in table),
    ]
    wrong = sorted({f"{c.where} ({c.how}): {c.name}" for c in checked if not resolves(cfg, c.name)})
    listing = "\n".join(wrong)
    assert not wrong, f"errors name config fields that configs/common.py lacks:\n{listing}"


def test_the_collector_sees_the_package_errors(package_names):
    """Not vacuous: the scan finds the config fields and keeps the files' fields apart."""
    claims, file_fields = package_names
    claimed = {(c.name, c.how) for c in claims}
    assert len(claims) > 80, len(claims)
    assert ("train.batch_size", "field=") in claimed
    assert ("eval.code_sandbox", "field=") in claimed  # through the module constant
    assert ("daar.tau", "field=") in claimed  # an f-string's literal head
    assert ("data.tokenizer", "message") in claimed and ("model.path", "message") in claimed
    kept_apart = {f.name for f in file_fields}
    # a record's messages, a model's config.json key, a GGUF metadata key: a file's fields
    assert {"messages", "architectures", "general.architecture"} <= kept_apart, kept_apart
    assert not {c.name for c in claims} & {"messages", "architectures", "general.architecture"}


def _names(source: str) -> tuple[set[str], set[str]]:
    path = os.path.join(PACKAGE, "_snippet.py")
    claims, file_fields = collect({path: source})
    return {c.name for c in claims}, {f.name for f in file_fields}


@pytest.mark.parametrize(
    "source, claims, file_fields",
    [
        ('raise InputError("x", field="curvature.operator")', {"curvature.operator"}, set()),
        ('raise InputError("x", field=f"daar.tau.{d}")', {"daar.tau"}, set()),
        ('raise InputError("x", field=f"daar.domains[{d}]")', {"daar.domains"}, set()),
        ('F = "eval.code_sandbox"\nraise InputError("x", field=F)', {"eval.code_sandbox"}, set()),
        ('raise InputError("x", field="seed")', {"seed"}, set()),
        # located in a file: the file's field, whatever it looks like
        ('raise InputError("x", path=p, field="messages")', set(), {"messages"}),
        ('raise InputError("x", record=3, field="train.oops")', set(), {"train.oops"}),
        ('raise InputError("x", field="response", **where)', set(), {"response"}),
        # not in the config's namespace: a batch key, an argument, a command-line flag
        ('raise InputError("x", field="weights")', set(), set()),
        ('raise InputError("x", field="--source")', set(), set()),
        ('raise InputError("x", field="CurvatureProblem.loss")', set(), set()),
        ('raise InputError("x", field=name)', set(), set()),
        # message text: dotted section.field names, file names excluded
        (
            'raise InputError("no tokenizer: set data.tokenizer or cfg.model.path")',
            {"data.tokenizer", "model.path"},
            set(),
        ),
        ('raise ValueError(f"set train.seq_len >= {n}")', {"train.seq_len"}, set()),
        ('raise InputError("no model.safetensors or influence.json")', set(), set()),
        ('raise InputError("see e.g. numpy.linalg")', set(), set()),
        ('logging.warning("set train.nothing")', set(), set()),  # not an error
        # a subclass of InputError defined in the package is an error class too
        (
            'class Mine(InputError):\n    pass\nraise Mine("x", field="train.oops")',
            {"train.oops"},
            set(),
        ),
    ],
)
def test_collector_rules(source, claims, file_fields):
    assert _names(source) == (claims, file_fields)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("influence.operator", True),
        ("curvature.operator", False),
        ("curvature", True),
        ("seed", True),
        ("data.demo_train_sizes.arithmetic", True),  # a key under a dict-valued field
        ("train.batch_size.x", False),  # nothing below a scalar field
        ("nosuch.field", False),
    ],
)
def test_resolves(name, ok):
    assert resolves(common.base_config(), name) is ok
