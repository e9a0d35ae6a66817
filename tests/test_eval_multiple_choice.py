"""Log-likelihood multiple choice: acc, length-normalized acc, MC2, prompt formats."""

import math

import pytest

from ideal_jax.evaluate import multiple_choice as mc


def _item(choices, gold):
    return {"context": "Q: ?\nA:", "choices": choices, "gold": gold}


def test_acc_and_acc_norm_differ_on_length_bias():
    # Raw log-likelihood prefers the short wrong option; per-byte it prefers the long gold option.
    table = {" no": -2.0, " a much longer correct answer": -6.0, " x": -9.0}
    calls = []

    def loglik_fn(reqs):
        calls.append(len(reqs))
        return [table[cont] for _, cont in reqs]

    items = [_item([" no", " a much longer correct answer", " x"], 1)]
    out = mc.score_multiple_choice(items, loglik_fn)
    assert out == {"n_examples": 1, "acc": 0.0, "acc_norm": 1.0}
    assert calls == [3]


def test_chunking_and_mixed_results():
    def loglik_fn(reqs):
        return [0.0 if "gold" in cont else -1.0 for _, cont in reqs]

    items = [_item([" a", " gold"], 1), _item([" gold", " b"], 0), _item([" gold", " b"], 1)]
    out = mc.score_multiple_choice(items, loglik_fn, chunk_size=2)
    assert out["acc"] == pytest.approx(2 / 3)


def test_loglik_fn_wrong_length_raises():
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        mc.score_multiple_choice([_item([" a", " b"], 0)], lambda reqs: [0.0])


def test_truthfulqa_mc2_mass():
    rec = {
        "question": "Is the sky green?",
        "choices": ["No", "Yes"],
        "gold": 0,
        "mc2_choices": ["No", "Not really", "Yes"],
        "mc2_labels": [1, 1, 0],
    }
    item = mc.truthfulqa_item(rec)
    assert item["context"] == "Q: Is the sky green?\nA:"
    lp = {" No": math.log(0.5), " Not really": math.log(0.25), " Yes": math.log(0.25)}
    out = mc.score_multiple_choice([item], lambda reqs: [lp[c] for _, c in reqs])
    assert out["acc"] == 1.0
    assert out["mc2"] == pytest.approx(0.75)


def test_mmlu_prompt_with_shot():
    shot = mc.mmlu_item({"question": "1+1?", "choices": ["1", "2"], "gold": 1, "subject": "math"})
    item = mc.mmlu_item(
        {"question": "2+2?", "choices": ["4", "5"], "gold": 0, "subject": "college_math"}, [shot]
    )
    assert item["context"] == (
        "The following are multiple choice questions (with answers) about college math.\n\n"
        "1+1?\nA. 1\nB. 2\nAnswer: B\n\n2+2?\nA. 4\nB. 5\nAnswer:"
    )
    assert item["choices"] == [" A", " B"]


def test_arc_and_hellaswag_formats():
    arc = mc.arc_item({"question": "Why?", "choices": ["because", "no"], "gold": 0})
    assert arc["context"] == "Question: Why?\nAnswer:" and arc["choices"][0] == " because"
    hs = mc.hellaswag_item(
        {
            "activity_label": "Baking",
            "ctx_a": "A man mixes flour.",
            "ctx_b": "he",
            "choices": ["adds eggs [title] Step 2.", "sleeps."],
            "gold": 0,
        }
    )
    assert hs["context"] == "Baking: A man mixes flour. He"
    assert hs["choices"][0] == " adds eggs. Step 2."
