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


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'fancy'"):
        build_prompt("q", None, "fancy")
