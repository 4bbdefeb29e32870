import pytest

from r1kit.grading import extract_answer, is_equiv, last_boxed, score_answer


@pytest.mark.parametrize("pred, gold", [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{3}{4}", "0.75"),
    ("1,000", "1000"),
    ("1,234,567.5", "1234567.5"),
    ("50\\%", "50"),
    ("-7", "-7"),
    ("18.0", "18"),
    ("\\{3,1,2\\}", "\\{1,2,3\\}"),
    ("(0, 1]", "(0,1]"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("\\text{Monday}", "Monday"),
    ("\\text{(C)}", "C"),
    ("x = 3", "3"),
    ("$12$", "12"),
    ("12.", "12"),
])
def test_equal_answers(pred, gold):
    assert is_equiv(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("2", "-2"),
    ("-2", "2"),
    ("\\frac{1}{3}", "0.5"),
    ("1001", "1,000"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("(0,1)", "(0,1]"),
    ("\\sqrt{3}", "2\\sqrt{2}"),
    ("Tuesday", "Monday"),
    ("", "3"),
    (None, "3"),
])
def test_unequal_answers(pred, gold):
    assert not is_equiv(pred, gold)


def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed("so \\boxed{1} no wait \\boxed{\\frac{a}{b^{2}}}.") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed 5 apples") == "5"
    assert last_boxed("unclosed \\boxed{12") is None
    assert last_boxed("no box") is None


def test_extract_answer_order_boxed_then_answer_block_then_last_number():
    assert extract_answer("<answer>7</answer> and \\boxed{8}") == "8"
    assert extract_answer("<think>3 + 4 = 7</think><answer> 7 </answer>") == "7"
    assert extract_answer("<answer>unclosed 9") == "unclosed 9"
    assert extract_answer("first 3 then 1,250.", gold="1250") == "1,250"
    # the last-number fallback only when the gold answer is numeric
    assert extract_answer("the set is 1 and 2", gold="\\{1,2\\}") is None


def test_score_answer():
    assert score_answer("<think>half</think> The answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score_answer("It is 1,000 dollars.", "1000") == 1.0
    assert score_answer("It is -2.", "2") == 0.0
