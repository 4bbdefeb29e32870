"""Prompt templates (R1-Zero for base models, chat for instruct models) and the trace splitter."""

from __future__ import annotations

from typing import Literal

Template = Literal["auto", "r1zero", "chat", "chat_plain", "raw"]
TEMPLATES: dict[str, str] = {
    "auto": "chat when the tokenizer has a chat template, else r1zero",
    "r1zero": "the DeepSeek-R1-Zero template: plain text, <think> and <answer> tags",
    "chat": "the model's chat template with a system prompt asking for <think> then \\boxed{} (or the task's format)",
    "chat_plain": "the model's chat template, the question alone (no system prompt)",
    "raw": "the question text as it is",
}

# Table 1 of the DeepSeek-R1 paper.
R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here "
    "</answer>. User: {prompt}. Assistant:"
)

BOXED = "in \\boxed{}"  # how the `chat` template asks for the final answer, unless a task says otherwise


def reasoning_system_prompt(answer_format: str = BOXED) -> str:
    """The `chat` template's system prompt: think inside <think> tags, then give the final answer answer_format."""
    return ("You are a helpful assistant. First think through the problem step by step inside <think> </think> "
            f"tags, then give the final answer {answer_format}.")


REASONING_SYSTEM_PROMPT = reasoning_system_prompt()

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def resolve_template(template: Template, tokenizer) -> str:
    """The concrete template `auto` stands for with this tokenizer."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "r1zero"
    return template


def build_prompt(question: str, tokenizer, template: Template = "auto", answer_format: str = BOXED) -> str:
    """The text the model is asked to continue for this question; the `chat` template's system prompt asks for
    the final answer answer_format (a task's own: code in a python block, say)."""
    template = resolve_template(template, tokenizer)
    if template == "r1zero":
        return R1_ZERO_TEMPLATE.format(prompt=question)
    if template == "raw":
        return question
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"template {template!r} needs a tokenizer with a chat template; use r1zero or raw")
    messages = [{"role": "user", "content": question}]
    if template == "chat":
        messages.insert(0, {"role": "system", "content": reasoning_system_prompt(answer_format)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def split_trace(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a completion; tolerates a missing opening tag and unclosed tags.

    Without any think tag the whole text is the answer. With `<think>` but no `</think>` the model
    never finished reasoning: all of it is reasoning and the answer is empty. An `<answer>` block,
    closed or not, is unwrapped.
    """
    close = text.find(THINK_CLOSE)
    if close >= 0:
        reasoning, answer = text[:close], text[close + len(THINK_CLOSE) :]
        open_ = reasoning.find(THINK_OPEN)
        if open_ >= 0:
            reasoning = reasoning[open_ + len(THINK_OPEN) :]
    elif THINK_OPEN in text:
        return text.split(THINK_OPEN, 1)[1].strip(), ""
    else:
        reasoning, answer = "", text
    start = answer.find(ANSWER_OPEN)
    if start >= 0:
        answer = answer[start + len(ANSWER_OPEN) :].split(ANSWER_CLOSE, 1)[0]
    return reasoning.strip(), answer.strip()
