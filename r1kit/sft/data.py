"""SFT examples from JSONL traces: token ids and the assistant-only loss mask.

A row is either chat `messages` (loss on every assistant message) or `prompt` + `reasoning` + `answer`,
which becomes the prompt r1kit's evaluation and rollouts use (`build_prompt` with the run's template)
followed by `<think>\\n{reasoning}\\n</think>\\n{answer}` and the end-of-turn token. Each segment (the text
between assistant turns, each assistant turn) is tokenized on its own, as generation does: the prompt is
encoded, then the model produces the completion's tokens after it, so training sees the same token
boundaries the model meets at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r1kit.prompts import THINK_CLOSE, THINK_OPEN, build_prompt, resolve_template
from r1kit.rollout.types import encode_prompt
from r1kit.tasks.base import DataError, Row, read_jsonl

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One training sequence: its token ids and which of them the loss is taken on."""

    input_ids: list[int]
    trainable: list[bool]
    line: int = 0  # the JSONL line it came from
    prompt: str = ""  # the question (the row's prompt, or its first user turn)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        """Tokens the loss is taken on (a trainable first token has nothing to be predicted from)."""
        return sum(self.trainable[1:])


def trace_completion(reasoning: str, answer: str) -> str:
    """The assistant's text for a reasoning trace and its final answer, in the format r1kit rewards; a trace
    without reasoning (a teacher that answered without <think> tags) is its answer alone."""
    if not reasoning.strip():
        return answer.strip()
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n{answer.strip()}"


def end_of_turn(tokenizer, template: str) -> str:
    """What the template writes after an assistant turn's text (`<|im_end|>\\n`; EOS for plain templates)."""
    if resolve_template(template, tokenizer) not in ("chat", "chat_plain"):
        return tokenizer.eos_token
    marker = "\x00turn\x00"  # text no template rewrites, to find where the turn's own text ends
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    return rendered[rendered.rindex(marker) + len(marker):]


def chat_segments(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """The chat template's text cut into (text, is_assistant) pieces, each assistant turn with its end tokens."""
    segments: list[tuple[str, bool]] = []
    done = ""  # the text rendered through the last assistant turn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not before.startswith(done) or not through.startswith(before) or \
                message["content"].strip() not in through[len(before):]:
            raise DataError("the model's chat template rewrites assistant turns (as templates that drop the "
                            "reasoning do): give this row as prompt + reasoning + answer")
        segments += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    rest = tokenizer.apply_chat_template(messages, tokenize=False)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


def row_segments(row: Row, template: str, tokenizer, end: str | None = None) -> list[tuple[str, bool]]:
    """(text, trainable) pieces of one row, in order.

    A prompt/reasoning/answer row is the prompt evaluation and rollouts build, then the trace and the
    template's end of turn (`end`, else end_of_turn's): never the template's rendering of the assistant
    turn, which some templates rewrite (DeepSeek-R1's distilled models' drop everything up to `</think>`).
    """
    if "messages" in row:
        return chat_segments(row["messages"], tokenizer)
    prompt = build_prompt(row["prompt"], tokenizer, template)
    completion = trace_completion(row["reasoning"], row["answer"])
    opened = THINK_OPEN + "\n"
    if prompt.endswith(opened) and completion.startswith(opened):  # a template that opens the reasoning itself
        completion = completion[len(opened):]
    return [(prompt, False), (completion + (end if end is not None else end_of_turn(tokenizer, template)), True)]


def encode_segments(segments: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the pieces, each encoded on its own (the first with the BOS token as prompts get it)."""
    ids: list[int] = []
    trainable: list[bool] = []
    for i, (text, train) in enumerate(segments):
        piece = encode_prompt(tokenizer, text) if i == 0 else tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        trainable += [train] * len(piece)
    return ids, trainable


def check_row(row: Row, path: str | Path) -> None:
    """A row is `messages` with an assistant turn, or has string `prompt`, `reasoning` and `answer`."""
    where = f"{path}:{row.get('_line', '?')}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} with role one of "
                            f"{', '.join(ROLES)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: 'messages' has no assistant turn to train on")
        return
    missing = [k for k in ("prompt", "reasoning", "answer") if not isinstance(row.get(k), str)]
    if missing:
        fields = ", ".join(k for k in row if k != "_line")
        raise DataError(f"{where}: expected 'messages', or string fields prompt, reasoning and answer; "
                        f"missing {', '.join(missing)} (fields: {fields})")


def load_examples(path: str | Path, tokenizer, template: str, max_seq_len: int) -> tuple[list[Example], int]:
    """The examples of a trace file and how many rows were longer than max_seq_len (left out)."""
    examples, too_long = [], 0
    end = end_of_turn(tokenizer, template)  # the same for every row
    for row in read_jsonl(path):
        check_row(row, path)
        try:
            ids, trainable = encode_segments(row_segments(row, template, tokenizer, end), tokenizer)
        except DataError as e:
            raise DataError(f"{path}:{row['_line']}: {e}") from None
        if len(ids) > max_seq_len:
            too_long += 1
            continue
        question = row.get("prompt") or next((m["content"] for m in row["messages"] if m["role"] == "user"), "")
        examples.append(Example(ids, trainable, row["_line"], question))
    if not examples:
        raise DataError(f"{path}: no row fits max_seq_len={max_seq_len}")
    return examples, too_long
