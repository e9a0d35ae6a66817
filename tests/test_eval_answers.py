"""Answer extraction and normalization: GSM8K numbers, MATH boxed answers, exact match."""

import pytest

from ideal_jax.evaluate import answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("The total is $1,234.", "1234"),
        ("It costs $ 18.00.", "18"),
        ("She ends with -5 apples", "-5"),
        ("So the answer is 12.0 dollars. Later 99 people", "12"),
        ("Counting 1,2,3 gives 3", "3"),
        ("half is .5", "0.5"),
        ("0.30 of it", "0.3"),
        ("no digits here", None),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert answers.extract_gsm8k_answer(text) == expected


def test_gsm8k_correct_cuts_at_next_question():
    gold = "48/2 = 24\n#### 24"
    assert answers.gsm8k_correct(" 24 clips. The answer is 24.\n\nQuestion: 7 apples?", gold)
    assert not answers.gsm8k_correct(" I think 25", gold)
    assert not answers.gsm8k_correct(" no idea", gold)


def test_gsm8k_prompt_fewshot():
    shot = {"question": "1+1?", "solution": "1+1=2\n#### 2"}
    p = answers.gsm8k_prompt("2+2?", [shot])
    assert p == "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+2?\nAnswer:"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{\sqrt{2}}} and", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{1} then finally \boxed{2}", "2"),
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"$\boxed 5$", "5"),
        (r"\boxed{3", None),
        ("nothing boxed", None),
    ],
)
def test_last_boxed(text, expected):
    assert answers.last_boxed(text) == expected


@pytest.mark.parametrize(
    "a, b",
    [
        (r"\frac{1}{2}", "1/2"),
        (r"\dfrac12", "0.5"),
        (r"\tfrac{3}{4}", "0.75"),
        (r"-\frac{3}{4}", "-3/4"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"5\text{ cm}", "5"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        ("90 degrees", "90"),
        (r"\text{(A)}", "(A)"),
        ("10.", "10"),
        ("x = 3", "3"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
        ("1,000", "1000"),
        (r"\$5", "5"),
        (r"50\%", "50"),
    ],
)
def test_math_equiv_true(a, b):
    assert answers.math_equiv(a, b)


@pytest.mark.parametrize("a, b", [("2", "3"), (r"\frac{1}{2}", r"\frac{1}{3}"), ("(1,2)", "(2,1)")])
def test_math_equiv_false(a, b):
    assert not answers.math_equiv(a, b)


def test_math_correct_uses_last_boxed_or_answer_is():
    assert answers.math_correct(r"We get $x=\boxed{\dfrac{1}{2}}$.", "0.5")
    assert answers.math_correct("The final answer is 7.", "7")
    assert not answers.math_correct(r"\boxed{7}\n\nProblem: \boxed{8}", "8")


@pytest.mark.parametrize(
    "completion, golds, expected",
    [
        ("The Eiffel Tower!", ["eiffel tower"], True),
        (" Paris\nQ: next question", "Paris", True),
        ("So the answer is (A).", "(A)", True),
        ("Let me think.\nSo the answer is True.", "True", True),
        ("an apple", ["Apple", "pear"], True),
        ("London", ["Paris", "City of Light"], False),
        ("", "x", False),
    ],
)
def test_exact_match(completion, golds, expected):
    assert answers.exact_match(completion, golds) is expected


def test_normalize_text():
    assert answers.normalize_text(" The  Cat, a dog. ") == "cat dog"


def test_qa_prompt_uses_first_alias():
    p = answers.qa_prompt("Capital of France?", [{"question": "2+2?", "answer": ["4", "four"]}])
    assert p == "Q: 2+2?\nA: 4\n\nQ: Capital of France?\nA:"


def test_strict_match_keeps_case_and_sign():
    assert answers.strict_match(" ABC \nmore text", "ABC")
    assert answers.strict_match("1  2 3", ["x", "1 2 3"])
    assert not answers.strict_match("abc", "ABC")
    assert not answers.strict_match("4", "-4")
