"""BIG-bench tasks → the project's JSONL domain files (run once by the user, before
configs/smollm2_bigbench.py):

    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d /tmp/bigbench    # 358 MB sdist
    python -m ideal_jax.data.prepare_bigbench --source /tmp/bigbench/bigbench-1.0.0.tar.gz \
        --out data/bigbench

`--source` is the sdist (.tar.gz, read without unpacking everything), an unpacked sdist or
repository, or its `bigbench/benchmark_tasks` folder; without it, an installed `bigbench` package's
files are used. Writes, into --out:

    train/<domain>.jsonl    prompt/response records (the IDEAL training domains)
    ref.jsonl               held-out reference set, `capability` = the domain (for α)
    test.jsonl              held-out test set: prompt, answer (all accepted strings), capability
    manifest.json           tasks per domain, split sizes, seed, source
    small/                  the same files cut to SMALL's sizes (the config's `:small` variant)

Every task's examples are shuffled with --seed and split test / reference / train, so the three
sets are disjoint; multiple-choice tasks list their options in the prompt and answer with the
correct option's text, graded by exact match like the rest.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tarfile
from collections.abc import Iterator

from ideal_jax.utils.atomic import atomic_file, write_json_atomic
from ideal_jax.utils.errors import InputError

# domain -> BIG-bench tasks (subtask folders with a task.json each).
DOMAINS: dict[str, tuple[str, ...]] = {
    "arithmetic": tuple(
        f"arithmetic/{d}_digit_{op}"
        for d in (1, 2, 3)
        for op in ("addition", "subtraction", "multiplication")
    ),
    "logic": (
        "logical_deduction/three_objects",
        "logical_deduction/five_objects",
        "date_understanding",
    ),
    "sorting": ("word_sorting",),
    "counting": ("object_counting",),
    "plausibility": ("navigate", "sports_understanding"),
}
TASKS_DIR = "bigbench/benchmark_tasks"
# Per-domain sizes of OUT/small/ (configs/smollm2_bigbench.py:small, a CPU run of minutes).
SMALL = {"train": 40, "ref": 8, "test": 20}


def read_tasks(source: str | None, tasks: set[str]) -> dict[str, dict]:
    """{task: parsed task.json} from the sdist, a folder, or the installed package."""
    if source is None:
        import importlib.util

        spec = importlib.util.find_spec("bigbench")  # not imported: its imports need TensorFlow
        if spec is None or not spec.submodule_search_locations:
            raise InputError(
                "no --source and no installed bigbench package; download the sdist with "
                "`pip download --no-deps --no-binary :all: bigbench==1.0.0`",
                field="--source",
            )
        source = os.path.join(list(spec.submodule_search_locations)[0], "benchmark_tasks")
    if os.path.isfile(source):
        return dict(_from_tar(source, tasks))
    root = next(
        (
            r
            for r in (
                source,
                os.path.join(source, TASKS_DIR),
                *glob.glob(f"{source}/*/{TASKS_DIR}"),
            )
            if all(os.path.isfile(os.path.join(r, t, "task.json")) for t in tasks)
        ),
        None,
    )
    if root is None:
        raise InputError(f"no {TASKS_DIR}/<task>/task.json for {sorted(tasks)}", path=source)
    out = {}
    for task in tasks:
        with open(os.path.join(root, task, "task.json"), encoding="utf-8") as f:
            out[task] = json.load(f)
    return out


def _from_tar(path: str, tasks: set[str]) -> Iterator[tuple[str, dict]]:
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise InputError(f"not a readable tar archive ({e})", path=path) from None
    found = set()
    with archive:
        for member in archive:
            name = member.name.replace("\\", "/")
            if not name.endswith("/task.json") or f"/{TASKS_DIR}/" not in f"/{name}":
                continue
            task = name.split(f"{TASKS_DIR}/", 1)[1][: -len("/task.json")]
            if task in tasks:
                found.add(task)
                yield task, json.load(archive.extractfile(member))
    missing = sorted(tasks - found)
    if missing:
        raise InputError(f"tasks missing from the archive: {missing}", path=path)


def convert_example(task: dict, example: dict, where: str) -> tuple[str, str, list[str]]:
    """(prompt, response, accepted answers) of one BIG-bench example."""
    prefix = task.get("task_prefix", "")
    question = f"{task.get('example_input_prefix', '')}{example['input']}".strip()
    scores = example.get("target_scores")
    target = example.get("target")
    if target is not None and (isinstance(target, str) or target):
        answers = [target] if isinstance(target, str) else [str(t) for t in target]
        prompt = f"{prefix}\n{question}".strip()
        # object_counting lists ["three", "3"]: train on the digits, accept both.
        response = next((a for a in answers if a.strip().isdigit()), answers[0])
        return prompt, response.strip(), [a.strip() for a in answers]
    if isinstance(scores, dict) and scores:
        best = max(scores.values())
        correct = [k for k, v in scores.items() if v == best]
        options = "\n".join(f"- {k}" for k in scores)
        prompt = f"{prefix}\n{question}\nOptions:\n{options}\nAnswer with one option.".strip()
        return prompt, correct[0].strip(), [c.strip() for c in correct]
    raise InputError("example has neither 'target' nor 'target_scores'", path=where)


def prepare(
    out: str,
    source: str | None,
    *,
    n_test: int,
    n_ref: int,
    max_train: int,
    seed: int,
) -> dict:
    tasks = read_tasks(source, {t for ts in DOMAINS.values() for t in ts})
    os.makedirs(os.path.join(out, "train"), exist_ok=True)
    manifest = {"source": source, "seed": seed, "domains": {}}
    ref_rows, test_rows = [], []
    for domain, names in DOMAINS.items():
        rows = []
        for name in names:
            examples = tasks[name].get("examples") or []
            for i, ex in enumerate(examples):
                prompt, response, answers = convert_example(tasks[name], ex, f"{name} example {i}")
                rows.append({"id": f"{name}:{i}", "prompt": prompt, "response": response})
                rows[-1]["answers"] = answers
        random.Random(f"{seed}:{domain}").shuffle(rows)
        test, ref, train = rows[:n_test], rows[n_test : n_test + n_ref], rows[n_test + n_ref :]
        train = train[:max_train] if max_train else train
        if not train:
            raise InputError(f"domain {domain!r} has no training examples left", field="--n_test")
        _write_jsonl(
            os.path.join(out, "train", f"{domain}.jsonl"),
            [{k: r[k] for k in ("id", "prompt", "response")} for r in train],
        )
        ref_rows += [
            {"id": r["id"], "prompt": r["prompt"], "response": r["response"], "capability": domain}
            for r in ref
        ]
        test_rows += [
            {"prompt": r["prompt"], "answer": r["answers"], "capability": domain} for r in test
        ]
        manifest["domains"][domain] = {
            "tasks": list(names),
            "train": len(train),
            "ref": len(ref),
            "test": len(test),
        }
    _write_jsonl(os.path.join(out, "ref.jsonl"), ref_rows)
    _write_jsonl(os.path.join(out, "test.jsonl"), test_rows)
    _write_small(out, SMALL)
    write_json_atomic(os.path.join(out, "manifest.json"), manifest)
    return manifest


def _write_small(out: str, sizes: dict[str, int]) -> None:
    """OUT/small/: the first examples of each split per domain (the config's `:small` variant)."""
    small = os.path.join(out, "small")
    os.makedirs(os.path.join(small, "train"), exist_ok=True)
    for domain in DOMAINS:
        rows = _read_jsonl(os.path.join(out, "train", f"{domain}.jsonl"))[: sizes["train"]]
        _write_jsonl(os.path.join(small, "train", f"{domain}.jsonl"), rows)
    for name in ("ref", "test"):
        rows, per_domain = _read_jsonl(os.path.join(out, f"{name}.jsonl")), {}
        keep = []
        for row in rows:
            per_domain[row["capability"]] = per_domain.get(row["capability"], 0) + 1
            if per_domain[row["capability"]] <= sizes[name]:
                keep.append(row)
        _write_jsonl(os.path.join(small, f"{name}.jsonl"), keep)


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--source", default=None, help="bigbench sdist .tar.gz or folder")
    parser.add_argument("--n_test", type=int, default=200, help="test examples per domain")
    parser.add_argument("--n_ref", type=int, default=50, help="reference examples per domain")
    parser.add_argument("--max_train", type=int, default=0, help="cap per domain (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        manifest = prepare(
            args.out,
            args.source,
            n_test=args.n_test,
            n_ref=args.n_ref,
            max_train=args.max_train,
            seed=args.seed,
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["domains"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
