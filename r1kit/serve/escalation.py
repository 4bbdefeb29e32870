"""Escalation: an upstream OpenAI-compatible endpoint answers what the local models visibly struggle with.

It goes through the endpoint teacher's client (r1kit/sample/endpoint.py: retries with backoff, a timeout), on a
thread, so the event loop never waits for it. When it fails the caller sends a local answer, marked not confident.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from r1kit.config import UpstreamConfig
from r1kit.sample.endpoint import BODY_CHARS, EndpointTeacher, TeacherError
from r1kit.serve.reasoning import split_reasoning
from r1kit.serve.schemas import ChatRequest

log = logging.getLogger("r1kit.serve")
# the client's own sampling settings go on as they were sent; the gate's (n, its temperature) are its own business
FORWARDED = ("temperature", "top_p", "max_tokens", "stop", "seed")


@dataclass(frozen=True)
class UpstreamAnswer:
    """The upstream's reply to one conversation, its reasoning apart from its answer."""

    model: str
    reasoning: str
    content: str
    finish_reason: str
    usage: dict[str, Any] | None


def provenance(answered_by: str, confident: bool, escalated: bool) -> dict[str, Any]:
    """The response's `r1kit` field: who answered, whether r1kit stands behind the answer, whether the upstream
    was asked."""
    return {"answered_by": answered_by, "confident": confident, "escalated": escalated}


class Upstream(EndpointTeacher):
    """The endpoint the gate escalates to and a route may name; its key read from the environment."""

    def __init__(self, cfg: UpstreamConfig):
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else ""  # "": no key, not the teacher's variable
        if key is None:
            raise ValueError(f"upstream.api_key_env names {cfg.api_key_env}, which is not set")
        super().__init__(cfg.url, cfg.model, api_key=key, concurrency=1, timeout_s=cfg.timeout_s,
                         max_retries=cfg.max_retries)
        self.name = cfg.name

    async def answer(self, messages: list[dict[str, str]], req: ChatRequest) -> UpstreamAnswer | None:
        """The upstream's answer to a conversation, awaited off the event loop; None (logged) if it failed."""
        try:
            return await asyncio.to_thread(self.chat, messages, req)
        except TeacherError as error:
            log.warning("upstream failed, a local answer goes back instead: %s", error)
            return None

    def chat(self, messages: list[dict[str, str]], req: ChatRequest) -> UpstreamAnswer:
        """One blocking chat request to the upstream (TeacherError once its retries are spent)."""
        settings = req.model_dump(include=set(FORWARDED), exclude_none=True)
        if req.max_completion_tokens is not None:
            settings["max_tokens"] = req.max_completion_tokens
        body = {**settings, "model": self.model, "messages": messages, "n": 1}
        reply = self._post(json.dumps(body).encode(), threading.Event())
        try:
            choice = reply["choices"][0]
            message = choice["message"]
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            content = message.get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise TeacherError(f"{self.endpoint}: malformed response: {json.dumps(reply)[:BODY_CHARS]}") from None
        if not reasoning:  # an endpoint that leaves the <think> block in the text (Ollama, say)
            reasoning, content = split_reasoning(content)
        usage = reply.get("usage")
        return UpstreamAnswer(str(reply.get("model") or self.model), reasoning, content,
                              choice.get("finish_reason") or "stop", usage if isinstance(usage, dict) else None)
