"""Splitting streamed text into reasoning and answer at `<think>` / `</think>`, tags split across chunks."""

from __future__ import annotations

from r1kit.prompts import THINK_CLOSE, THINK_OPEN


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of text that could be the start of tag (to hold back until known)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """A state machine fed text deltas; each feed returns (reasoning delta, content delta).

    Output that opens with `<think>` (after whitespace) is reasoning until `</think>`, then content.
    Output without the tag is content, unless the prompt already opened the block (`in_reasoning`),
    as chat templates that prefill `<think>` do. Tags may arrive split across any number of deltas.
    """

    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, str]:
        """The reasoning and content text that this delta completes."""
        self.pending += delta
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.state, self.pending = "reasoning", stripped[len(THINK_OPEN) :]
                    continue
                if THINK_OPEN.startswith(stripped):  # maybe the tag, not yet complete
                    return reasoning, content
                self.state = "content"
            if self.state == "reasoning":
                end = self.pending.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end]
                    self.state, self.pending = "content", self.pending[end + len(THINK_CLOSE) :]
                    continue
                keep = _held_prefix(self.pending, THINK_CLOSE)
                reasoning += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                return reasoning, content
            content += self.pending
            self.pending = ""
            return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Whatever was held back, once the stream has ended."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.state == "reasoning" else ("", rest)


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, content) of a whole completion, exactly as the streamed deltas add up."""
    splitter = ReasoningSplitter(in_reasoning)
    a, b = splitter.feed(text)
    c, d = splitter.finish()
    return a + c, b + d
