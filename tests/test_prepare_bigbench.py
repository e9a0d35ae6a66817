"""BIG-bench → domain files (ideal_jax/data/prepare_bigbench.py) and the config that reads them.

The fast tests run on a small synthetic sdist written here (same layout and task.json fields as
bigbench 1.0.0); the last test reads the real sdist when BIGBENCH_SDIST names it or the bigbench
package is installed, and skips otherwise.
"""

import importlib.util
import io
import json
import os
import tarfile

import pytest

from configs import smollm2_bigbench
from ideal_jax import stages
from ideal_jax.data import prepare_bigbench
from ideal_jax.data.domains import load_domains, load_reference
from ideal_jax.evaluate.loaders import load_benchmark


def _task(i_task: int, name: str) -> dict:
    if name == "object_counting":
        examples = [
            {"input": f"I have {k} cats. How many?", "target": ["x", str(k)]} for k in range(60)
        ]
    elif name in ("word_sorting",) or name.startswith("arithmetic"):
        examples = [{"input": f"{name} q{k}", "target": f"a{k}"} for k in range(60)]
    else:
        examples = [
            {"input": f"{name} q{k}", "target_scores": {f"yes{k}": 1, f"no{k}": 0}}
            for k in range(60)
        ]
    return {"name": name, "task_prefix": f"Task {i_task}.", "examples": examples}


def _fake_sdist(path) -> str:
    with tarfile.open(path, "w:gz") as tar:
        tasks = sorted({t for ts in prepare_bigbench.DOMAINS.values() for t in ts})
        for i, name in enumerate(tasks):
            data = json.dumps(_task(i, name)).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_prepare_writes_disjoint_splits_and_the_small_variant(tmp_path):
    source = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = str(tmp_path / "bb")
    manifest = prepare_bigbench.prepare(out, source, n_test=25, n_ref=10, max_train=0, seed=0)
    assert list(manifest["domains"]) == list(smollm2_bigbench.DOMAINS)
    for domain, sizes in manifest["domains"].items():
        total = 60 * len(prepare_bigbench.DOMAINS[domain])
        assert (sizes["test"], sizes["ref"], sizes["train"]) == (25, 10, total - 35)
        train = {r["prompt"] for r in _jsonl(f"{out}/train/{domain}.jsonl")}
        ref = {r["prompt"] for r in _jsonl(f"{out}/ref.jsonl") if r["capability"] == domain}
        test = {r["prompt"] for r in _jsonl(f"{out}/test.jsonl") if r["capability"] == domain}
        assert len(train) == sizes["train"] and len(ref) == 10 and len(test) == 25
        assert not (train & ref or train & test or ref & test)
    counting = _jsonl(f"{out}/train/counting.jsonl")[0]
    assert counting["response"].isdigit()  # ["x", "7"]: the digits are trained
    logic = _jsonl(f"{out}/train/logic.jsonl")[0]
    assert "Options:\n- yes" in logic["prompt"] and logic["response"].startswith("yes")
    test = load_benchmark("exact_match", f"{out}/test.jsonl")
    assert {r["capability"] for r in test} == set(smollm2_bigbench.DOMAINS)
    # The config's files load as domains and reference; :small reads OUT/small.
    cfg = smollm2_bigbench.get_config(f"small,data={out}")
    domains = load_domains(dict(cfg.data.domains))
    small = {d: min(40, v["train"]) for d, v in manifest["domains"].items()}
    assert {d: len(v) for d, v in domains.items()} == small
    reference = load_reference(cfg.data.reference_source)
    assert all(len(v) == prepare_bigbench.SMALL["ref"] for v in reference.values())
    assert len(_jsonl(cfg.eval.tasks.bigbench.path)) == 5 * prepare_bigbench.SMALL["test"]


def test_missing_task_and_bad_source_are_named(tmp_path):
    with tarfile.open(tmp_path / "empty.tar.gz", "w:gz"):
        pass
    code = prepare_bigbench.main(["--source", str(tmp_path / "empty.tar.gz"), "--out", "x"])
    assert code == 2
    with pytest.raises(Exception, match="task.json"):
        prepare_bigbench.read_tasks(str(tmp_path), {"word_sorting"})


def test_config_arguments():
    cfg = smollm2_bigbench.get_config("data=/d,model=/m.gguf")
    assert cfg.model.path == "/m.gguf" and cfg.rounds == 2
    assert cfg.data.domains.logic == "/d/train/logic.jsonl"
    with pytest.raises(ValueError, match="unknown argument"):
        smollm2_bigbench.get_config("tiny")
    cpu = smollm2_bigbench.get_config("cpu,data=/d,model=/m.gguf")
    assert cpu.train.finetuning == "freeze" and cpu.train.freeze_trainable_layers == 2
    assert cpu.data.max_examples_per_domain == 64 and cpu.rounds == 3
    assert cpu.eval.tasks.bigbench.limit_per_capability == 20
    stages.load(cpu)
    with pytest.raises(ValueError, match="one of small and cpu"):
        smollm2_bigbench.get_config("small,cpu")


def test_smollm2_demo_cpu_setting():
    from configs import smollm2_demo

    cfg = smollm2_demo.get_config("cpu,seeds=3,model=/m.gguf")
    assert cfg.seeds == 3 and cfg.model.path == "/m.gguf" and cfg.data.demo
    assert cfg.train.finetuning == "freeze" and cfg.train.freeze_trainable_layers == 2
    sizes = dict(cfg.data.demo_train_sizes)
    assert sum(sizes.values()) == 1400 and sizes["cities"] == 60  # the demo's D0, scaled 0.2
    stages.load(cfg)


def test_real_bigbench_sdist(tmp_path):
    source = os.environ.get("BIGBENCH_SDIST")
    if not source and importlib.util.find_spec("bigbench") is None:
        pytest.skip("set BIGBENCH_SDIST to the bigbench 1.0.0 sdist (or install bigbench)")
    manifest = prepare_bigbench.prepare(
        str(tmp_path / "bb"), source, n_test=200, n_ref=50, max_train=0, seed=0
    )
    sizes = {d: v["train"] + v["ref"] + v["test"] for d, v in manifest["domains"].items()}
    assert sizes == {
        "arithmetic": 6300,  # 1-digit tasks hold fewer than 1,000 distinct problems
        "logic": 300 + 500 + 369,
        "sorting": 1900,
        "counting": 1000,
        "plausibility": 2000,
    }
