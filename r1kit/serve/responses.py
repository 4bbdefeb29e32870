"""OpenAI response bodies from engine events: text deltas of each choice, SSE streams of chat and completion
chunks, and replies that exist whole (the gate's, the upstream's)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from tokenizers.decoders import DecodeStream

from r1kit.serve.reasoning import ReasoningSplitter
from r1kit.serve.schemas import APIError, usage
from r1kit.serve.worker import Event


class ChoiceText:
    """Turns a choice's token events into text deltas, detokenizing incrementally.

    A fast tokenizer's own DecodeStream (Rust) turns each token into the text it completes; any other decodes a
    short window (the previous token's start onwards), not the whole output, so a long reply costs the same per
    token as a short one. Text is held back while it ends in an incomplete UTF-8 character or could be the
    start of a stop string, so a stream never shows what the final message will not contain.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.ids = tokenizer, []
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.stream = DecodeStream(skip_special_tokens=True) if self.backend is not None else None
        self.text, self.sent = "", ""
        self.prefix = self.read = 0
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.finish_reason: str | None = None
        self.tokens = 0

    def add(self, event: Event) -> str:
        """The text this event adds."""
        self.tokens += 1
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            new = event.text[len(self.sent):] if event.text.startswith(self.sent) else ""
            self.sent = event.text
            return new
        piece = self.stream.step(self.backend, event.token) if self.stream is not None else self._windowed(event.token)
        if not piece:
            return ""
        self.text += piece
        safe = self.text[: len(self.text) - self.hold] if self.hold else self.text
        if len(safe) <= len(self.sent):
            return ""
        new, self.sent = safe[len(self.sent):], safe
        return new

    def _windowed(self, token: int) -> str:
        """The text a token completes, from decoding the window that ends with it."""
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before, after = decode(self.ids[self.prefix : self.read]), decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


def sse(data: Any) -> str:
    """One server-sent event carrying data as JSON."""
    return f"data: {json.dumps(data)}\n\n"


def whole_reply(model: str, reasoning: str, content: str, finish_reason: str, tokens: dict[str, Any] | None,
           extra: dict[str, Any], stream: bool) -> dict[str, Any] | StreamingResponse:
    """A reply that exists whole (the gate's, the upstream's): a chat.completion, or one chunk when streamed."""
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model, **extra}
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None,
               "reasoning": reasoning or None}
    if not stream:
        return {**meta, "object": "chat.completion", "usage": tokens,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}]}
    delta = {"role": "assistant", "content": content}
    if reasoning:
        delta.update(reasoning_content=reasoning, reasoning=reasoning)
    chunk = {**meta, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return StreamingResponse(iter([sse(chunk), "data: [DONE]\n\n"]), media_type="text/event-stream")


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of a text, as the usage counts them."""
    return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0


async def collect(events: AsyncIterator, choices: list[ChoiceText], n: int) -> None:
    """Feed every event to its choice (prompt p's sample i is choice p * n + i) until all have ended."""
    async for p, batch in events:
        for event in batch:
            choices[p * n + event.index].add(event)


async def ending_errors(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's chunks; an error once it has begun (its status is sent) ends it with OpenAI's error chunk."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as error:
        yield sse(error.body)
        yield "data: [DONE]\n\n"


async def chat_stream(meta: dict, choices: list[ChoiceText], splitters: list[ReasoningSplitter],
                      events: AsyncIterator, prompt_tokens: int, include_usage: bool, tokenizer
                      ) -> AsyncIterator[str]:
    """A chat completion's SSE chunks: reasoning and content deltas apart, then usage if asked, then [DONE]."""
    chunk = {**meta, "object": "chat.completion.chunk"}
    for i in range(len(choices)):
        yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
    reasoning_text = [""] * len(choices)
    async for _, batch in events:
        deltas: dict[int, list[str]] = {}  # choice -> [reasoning, content] this batch adds
        for event in batch:
            choice, splitter = choices[event.index], splitters[event.index]
            reasoning, content = splitter.feed(choice.add(event))
            if choice.finish_reason:
                tail = splitter.finish()
                reasoning, content = reasoning + tail[0], content + tail[1]
            added = deltas.setdefault(event.index, ["", ""])
            added[0], added[1] = added[0] + reasoning, added[1] + content
        for index, (reasoning, content) in deltas.items():
            reasoning_text[index] += reasoning
            delta = {}
            if reasoning:
                delta.update(reasoning_content=reasoning, reasoning=reasoning)
            if content:
                delta["content"] = content
            finish = choices[index].finish_reason
            if delta or finish:
                yield sse({**chunk, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})
    if include_usage:
        reasoning_tokens = sum(count_tokens(tokenizer, r) for r in reasoning_text)
        yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, sum(c.tokens for c in choices),
                                                          reasoning_tokens)})
    yield "data: [DONE]\n\n"


async def completion_stream(meta: dict, choices: list[ChoiceText], events: AsyncIterator, n: int
                            ) -> AsyncIterator[str]:
    """A text completion's SSE chunks (prompt p's sample i is choice p * n + i), then [DONE]."""
    async for p, batch in events:
        texts: dict[int, str] = {}  # choice -> the text this batch adds
        for event in batch:
            index = p * n + event.index
            texts[index] = texts.get(index, "") + choices[index].add(event)
        for index, text in texts.items():
            if text or choices[index].finish_reason:
                yield sse({**meta, "object": "text_completion", "choices": [
                    {"index": index, "text": text, "finish_reason": choices[index].finish_reason,
                     "logprobs": None}]})
    yield "data: [DONE]\n\n"
