import pytest

from r1kit.rewards import (
    accuracy_reward,
    format_reward,
    language_consistency_reward,
    make_reward,
    reward_columns,
    score_completions,
    soft_overlong_penalty,
    tag_count_reward,
)


def test_accuracy_reward_trl_signature_and_messages():
    completions = ["\\boxed{0.5}", [{"role": "assistant", "content": "<answer>1/2</answer>"}], "It is 3."]
    assert accuracy_reward(completions, answer=["\\frac{1}{2}", "0.5", "4"], prompts=["p"] * 3) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("text, score", [
    ("<think>add them</think> \\boxed{7}", 1.0),
    ("<think>add them</think><answer>7</answer>", 1.0),
    ("  <think>\nadd\n</think>\n7", 1.0),
    ("<think>add them</think>", 0.0),             # no answer
    ("<think>add them</think><answer></answer>", 0.0),
    ("<think></think> 7", 0.0),                  # empty reasoning
    ("7 <think>late</think> 7", 0.0),            # text before the reasoning
    ("<think>a</think> 7 <think>b</think> 8", 0.0),
    ("<think>a</think><answer>7", 0.0),          # unclosed answer
    ("no tags at all", 0.0),
])
def test_format_reward(text, score):
    assert format_reward([text]) == [score]


def test_tag_count_reward_partial_credit():
    assert tag_count_reward([
        "<think>a</think><answer>7</answer>",
        "<think>a</think> \\boxed{7}",
        "<think>a</think>",
        "<think>a",
        "nothing",
        "<think>a</think><answer>7</answer><answer>8</answer>",
    ]) == [1.0, 1.0, 0.5, 0.25, 0.0, 0.5]


def test_language_consistency_reward():
    prompts = ["What is two plus two?", "二加二等于几？", "What is two plus two?"]
    completions = ["<think>two and two make four</think>4", "<think>二加二 is four</think>4",
                   "<think>два plus два</think>4"]
    scores = language_consistency_reward(completions, prompts=prompts)
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx(1 / 3)  # "二加二" (one CJK word), "is", "four"
    assert scores[2] == pytest.approx(1 / 3)


def test_soft_overlong_penalty():
    fn = make_reward("length", max_tokens=100, buffer_tokens=20)
    ids = [[0] * 50, [0] * 80, [0] * 90, [0] * 100, [0] * 130]
    assert fn(["x"] * 5, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert soft_overlong_penalty(["x" * 360], max_tokens=100, buffer_tokens=20) == [-0.5]


def test_weighted_sum_and_raising_reward_scores_zero_with_warning():
    def flaky(completions, answer, **kw):
        return [1 / (int(a) - 2) for a in answer]  # raises on answer 2 only

    completions = ["<think>x</think> \\boxed{1}", "<think>x</think> \\boxed{2}", "\\boxed{3}"]
    columns = reward_columns([{"answer": "1"}, {"answer": "2"}, {"answer": "4"}], ["p"] * 3)
    rewards = {"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.5), "flaky": (flaky, 2.0)}
    with pytest.warns(RuntimeWarning) as caught:
        scores = score_completions(rewards, completions, columns)
    assert [str(w.message) for w in caught] == [
        "reward 'flaky' raised on 1 of 3 samples (first: ZeroDivisionError: division by zero); scored 0.0"]
    assert scores.per_reward["flaky"] == [-1.0, 0.0, 0.5]
    assert scores.failures == {"flaky": 1}
    assert scores.total == [1.0 + 0.5 - 2.0, 1.0 + 0.5 + 0.0, 0.0 + 0.0 + 1.0]


def test_a_raising_reward_warning_names_the_first_failing_samples_exception():
    def picky(completions, answer, **kw):
        if len(answer) > 1:
            raise RuntimeError("batch calls fail")  # each sample is then scored on its own
        if answer[0] == "x":
            raise KeyError("no such column")
        return [float(answer[0])]

    def silent(completions, **kw):
        raise ValueError("")

    columns = {"answer": ["1", "x", "nan?", "4"]}
    with pytest.warns(RuntimeWarning) as caught:
        scores = score_completions({"picky": (picky, 1.0), "silent": (silent, 1.0)}, ["a"] * 4, columns)
    assert [str(w.message) for w in caught] == [
        "reward 'picky' raised on 2 of 4 samples (first: KeyError: 'no such column'); scored 0.0",
        "reward 'silent' raised on 4 of 4 samples (first: ValueError); scored 0.0"]
    assert scores.per_reward["picky"] == [1.0, 0.0, 0.0, 4.0] and scores.failures == {"picky": 2, "silent": 4}


def test_unknown_reward():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        make_reward("nope")


def test_build_rewards_from_config(tmp_path):
    from r1kit.rewards import build_rewards

    mine = tmp_path / "my_rewards.py"
    mine.write_text("def shorter(completions, **kw):\n    return [1.0 / len(c) for c in completions]\n")
    rewards = build_rewards({"accuracy": 1.0, "format": 0.25, "length": {"weight": 0.5, "max_tokens": 4,
                             "buffer_tokens": 2}, f"{mine}:shorter": 2.0})
    assert {k: w for k, (_, w) in rewards.items()} == {"accuracy": 1.0, "format": 0.25, "length": 0.5,
                                                         f"{mine}:shorter": 2.0}
    scores = score_completions(rewards, ["<think>a</think>\\boxed{4}"], {"answer": ["4"], "completion_ids": [[1] * 3]})
    assert scores.total == [pytest.approx(1.0 + 0.25 - 0.25 + 2.0 / 25)]
    with pytest.raises(ValueError, match="reward 'nope:fn': cannot import 'nope'"):
        build_rewards({"nope:fn": 1.0})


def test_marker_reward_partial_format_credit():
    from r1kit.rewards import marker_reward

    texts = ["so Answer: 42", "Answer: maybe 42", "Answer: x. Answer: -7", "no marker 42", "Answer:$5"]
    assert marker_reward(texts) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert marker_reward(["Final: 3"], marker="Final:") == [1.0]


def test_equation_reward_partial_countdown_credit():
    from r1kit.rewards import equation_reward

    texts = ["<answer>3 * 5 - 7</answer>", "<answer>(3 + 3) * 5</answer>", "<answer>nothing</answer>",
             "3 * 5 + 7", "<think>x</think><answer> 7 - 5 = 2 </answer>"]
    assert equation_reward(texts, numbers=[[3, 5, 7]] * 5) == [1.0, 0.5, 0.5, 0.0, 1.0]
