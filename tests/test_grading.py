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


def test_extract_answer_boxed_first_then_answer_block_then_math_verify():
    assert extract_answer("<answer>7</answer> and \\boxed{8}") == "8"
    assert extract_answer("<think>3 + 4 = 7</think><answer> 7 </answer>") == "7"
    assert extract_answer("<answer>unclosed 9") == "9"
    assert extract_answer("first 3 then 1,250.") == "1250"
    assert extract_answer("<think>x</think><answer>Monday</answer>") == "Monday"  # no math: the block as written
    assert extract_answer("no answer here") is None


def test_score_answer():
    assert score_answer("<think>half</think> The answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score_answer("It is 1,000 dollars.", "1000") == 1.0
    assert score_answer("It is -2.", "2") == 0.0


@pytest.mark.parametrize("completion, gold", [
    # the examples: written as math-verify reads them, graded as it grades them
    ("The answer is $\\frac13$.", "\\frac{1}{3}"),
    ("The answer is $\\dfrac{1}{3}$.", "1/3"),
    ("The rate is 28 percent.", "28"),
    ("The rate is 28 percent.", "28\\%"),
    ("So $x \\in [0,1)$.", "[0,1)"),
    ("They paid 1 000 dollars.", "1000"),
    ("We get \\[ \\boxed{(1, 2)} \\]", "(1,2)"),
    ("Answer: 42", "42"),
    ("The final answer is $\\boxed{\\begin{pmatrix} -7 \\\\ 16 \\end{pmatrix}}$.",
     "\\begin{pmatrix} -7 \\\\ 16 \\end{pmatrix}"),
    ("\\boxed{-2, 1}", "-2,1"),  # MATH writes a list of solutions bare
])
def test_math_verify_reads_the_final_answer(completion, gold):
    assert score_answer(completion, gold) == 1.0


@pytest.mark.parametrize("completion, gold", [
    # r1kit's own rule: an <answer> block is the answer, LaTeX even without $; math-verify alone would
    # find nothing in it, or the stray 5 of the reasoning
    ("<think>I guess 5.</think><answer>\\sqrt{2}</answer>", "\\sqrt{2}"),
    ("<think>I guess 5.</think><answer>x^2+1</answer>", "x^2 + 1"),
    ("<think>I guess 5.</think><answer>\\frac{\\pi}{2}</answer>", "\\pi/2"),
    ("<think>I guess 5.</think><answer>12 apples</answer>", "12"),
])
def test_r1kit_rules_add_to_math_verify(completion, gold):
    from math_verify import parse, verify

    assert score_answer(completion, gold) == 1.0
    assert not verify(parse(f"${gold}$"), parse(completion))


@pytest.mark.parametrize("completion, gold", [
    ("<think>I guess \\sqrt{2}.</think><answer>5</answer>", "\\sqrt{2}"),
    ("\\boxed{1} no wait \\boxed{3}", "1"),
    ("<answer>7</answer> and \\boxed{8}", "7"),  # \\boxed{} first
    ("The answer is $\\frac{1}{3}$.", "0.5"),
    ("\\boxed{Tuesday}", "\\text{Monday}"),
    ("no answer here", "3"),
])
def test_wrong_or_missing_answers_score_zero(completion, gold):
    assert score_answer(completion, gold) == 0.0


def test_grading_from_a_worker_thread_has_no_signal_timeout():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        scores = list(pool.map(score_answer, ["so \\boxed{\\frac{2}{4}}", "It is 7."], ["0.5", "7"]))
    assert scores == [1.0, 1.0]
