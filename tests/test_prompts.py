import pytest

from r1kit.prompts import R1_ZERO_TEMPLATE, REASONING_SYSTEM_PROMPT, build_prompt, resolve_template, split_trace


@pytest.mark.parametrize("text, expected", [
    ("<think>a</think>b", ("a", "b")),
    ("<think> a </think> <answer> 5 </answer>", ("a", "5")),
    ("a</think>b", ("a", "b")),  # opening tag prefilled in the prompt
    ("<think>still thinking", ("still thinking", "")),
    ("just an answer", ("", "just an answer")),
    ("<think>x</think><answer>unclosed", ("x", "unclosed")),
    ("<think>x</think>text <answer>7</answer> more", ("x", "7")),
    ("", ("", "")),
])
def test_split_trace(text, expected):
    assert split_trace(text) == expected


def test_r1zero_template_is_the_papers():
    prompt = build_prompt("What is 2+2?", tokenizer=None, template="r1zero")
    assert prompt == R1_ZERO_TEMPLATE.format(prompt="What is 2+2?")
    assert prompt.endswith("User: What is 2+2?. Assistant:")
    assert "<think> reasoning process here </think> <answer> answer here </answer>" in prompt


def test_chat_template_carries_the_reasoning_system_prompt(tokenizer):
    prompt = build_prompt("What is 2+2?", tokenizer, "auto")
    assert resolve_template("auto", tokenizer) == "chat"
    assert REASONING_SYSTEM_PROMPT in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert REASONING_SYSTEM_PROMPT not in build_prompt("q", tokenizer, "chat_plain")
    assert build_prompt("q", tokenizer, "raw") == "q"


def test_a_task_with_its_own_answer_format_gets_a_system_prompt_asking_for_it(tokenizer):
    from r1kit.tasks import load_task

    code, math = load_task("functions", n=2), load_task("arithmetic", n=2)
    assert code.answer_format == "in a ```python code block" and math.answer_format == "in \\boxed{}"
    prompt = build_prompt("Write f.", tokenizer, "chat", code.answer_format)
    assert ("inside <think> </think> tags, then give the final answer in a ```python code block.<|im_end|>\n"
            "<|im_start|>user\nWrite f.") in prompt
    assert build_prompt("q", tokenizer, "chat", math.answer_format) == build_prompt("q", tokenizer, "chat")
    assert REASONING_SYSTEM_PROMPT.endswith("then give the final answer in \\boxed{}.")


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'fancy'"):
        build_prompt("q", None, "fancy")
