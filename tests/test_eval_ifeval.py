"""IFEval-style verifiable instructions: each checker, plus prompt/instruction-level accuracy."""

import pytest

from ideal_jax.evaluate import ifeval


@pytest.mark.parametrize(
    "inst, kwargs, good, bad",
    [
        (
            "length_constraints:number_words",
            {"relation": "less than", "num_words": 4},
            "one two three",
            "one two three four",
        ),
        (
            "length_constraints:number_words",
            {"relation": "at least", "num_words": 3},
            "one two three",
            "one two",
        ),
        (
            "length_constraints:number_sentences",
            {"relation": "less than", "num_sentences": 3},
            "Dr. Smith paid 3.5 dollars. Done!",
            "One. Two. Three.",
        ),
        (
            "length_constraints:number_paragraphs",
            {"num_paragraphs": 2},
            "First part.\n***\nSecond part.",
            "First.\n***\n***\nSecond.",
        ),
        (
            "keywords:existence",
            {"keywords": ["banana", "kiwi"]},
            "A Banana and a kiwi.",
            "Only a banana.",
        ),
        (
            "keywords:forbidden_words",
            {"forbidden_words": ["bad"]},
            "This is badminton.",
            "This is Bad.",
        ),
        (
            "keywords:frequency",
            {"keyword": "go", "frequency": 2, "relation": "at least"},
            "go go",
            "go",
        ),
        ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
        ("change_case:english_lowercase", {}, "all lower here", "Not lower"),
        ("change_case:english_capital", {}, "ALL CAPS 1", "Not caps"),
        (
            "detectable_format:number_bullet_lists",
            {"num_bullets": 2},
            "* one\n* two",
            "* one\n- two\n* three",
        ),
        (
            "startend:end_checker",
            {"end_phrase": "Any other questions?"},
            "Bye. Any other questions?",
            "Any other questions? Bye.",
        ),
        ("startend:starts_with", {"start_phrase": "Dear Sir"}, "dear sir, hello", "Hello"),
        (
            "detectable_content:number_placeholders",
            {"num_placeholders": 2},
            "Hi [name] at [address]",
            "Hi [name]",
        ),
        ("detectable_format:title", {}, "<<My Title>>\nbody", "My Title\nbody"),
        ("punctuation:no_comma", {}, "no commas here", "a, b"),
        (
            "detectable_content:postscript",
            {"postscript_marker": "P.S."},
            "Hello.\nP.S. see you",
            "Hello.",
        ),
        (
            "detectable_format:number_highlighted_sections",
            {"num_highlights": 2},
            "*one* and **two**",
            "*one* only",
        ),
        ("combination:two_responses", {}, "A\n******\nB", "A\n******\nA"),
        (
            "length_constraints:nth_paragraph_first_word",
            {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
            "First.\n\nThen, more.",
            "First.\n\nAfter.",
        ),
    ],
)
def test_checkers(inst, kwargs, good, bad):
    assert ifeval.check_instruction(inst, good, kwargs) is True
    assert ifeval.check_instruction(inst, bad, kwargs) is False


def test_none_kwargs_are_dropped_and_unknown_ids_reported():
    kw = {"num_words": 5, "relation": "at least", "keywords": None, "num_bullets": None}
    assert ifeval.check_instruction("length_constraints:number_words", "a b c d e", kw)
    assert ifeval.check_instruction("language:response_language", "hi", {}) is None


def test_score_ifeval_prompt_and_instruction_level():
    records = [
        {
            "prompt": "p1",
            "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
            "kwargs": [{}, {}],
        },
        {"prompt": "p2", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
        {
            "prompt": "p3",
            "instruction_id_list": ["language:response_language"],
            "kwargs": [{"language": "en"}],
        },
    ]
    responses = ["all lower, but a comma", "<<Title>> ok", "anything"]
    out = ifeval.score_ifeval(records, responses)
    assert out["prompt_level_strict_acc"] == pytest.approx(1 / 3)
    assert out["inst_level_strict_acc"] == pytest.approx(2 / 4)
    assert out["unsupported_instructions"] == {"language:response_language": 1}


def test_loose_accepts_response_without_first_line():
    rec = {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    out = ifeval.score_ifeval([rec], ["Sure, here it is:\nno commas at all"])
    assert out["prompt_level_strict_acc"] == 0.0
    assert out["prompt_level_loose_acc"] == 1.0
