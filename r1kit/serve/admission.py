"""Admission: what the server holds for its clients (requests, capped by --max-concurrent, of sequences, capped by
--max-sequences-per-request), and giving it back whichever way a request ends, the client leaving included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from r1kit.config import ServeConfig
from r1kit.serve.schemas import APIError

T = TypeVar("T")


class Load:
    """What the server holds for its clients: requests and their sequences, counted from admission until the
    last event is sent or the client leaves. A request holds at most max_sequences_per_request sequences (n x
    prompts), so the server holds at most max_concurrent x that many."""

    def __init__(self, cfg: ServeConfig):
        self.max_requests, self.max_per_request = cfg.max_concurrent, cfg.max_sequences_per_request
        self.requests = self.sequences = 0

    def admit(self, sequences: int) -> Slot:
        """A slot for a request of this many sequences, or APIError 400 (never fits) / 429 (not now)."""
        if sequences > self.max_per_request:
            raise APIError(400, f"this request asks for {sequences} sequences (n x prompts); this server allows at "
                           f"most {self.max_per_request} a request (max_sequences_per_request)", param="n")
        if self.requests >= self.max_requests:
            raise APIError(429, f"{self.requests} requests ({self.sequences} sequences) are in flight; this server "
                           f"holds {self.max_requests} (max_concurrent); try again shortly",
                           kind="rate_limit_error", code="too_many_requests")
        return Slot(self, sequences)


class Slot:
    """One admitted request's share of the Load, given back once (by whichever of its holders ends first)."""

    def __init__(self, load: Load, sequences: int):
        self.load, self.sequences, self.held = load, sequences, True
        load.requests, load.sequences = load.requests + 1, load.sequences + sequences

    def release(self) -> None:
        if self.held:
            self.held = False
            self.load.requests, self.load.sequences = self.load.requests - 1, self.load.sequences - self.sequences


class SlotStream(StreamingResponse):
    """A streamed response that gives its slot back when it ends, also when the client left before its first
    chunk (then the generator holding the slot never ran, and its `finally` with it)."""

    def __init__(self, chunks: AsyncIterator[str], slot: Slot):
        super().__init__(chunks, media_type="text/event-stream")
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
            await self.body_iterator.aclose()


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled (aborting its generation, as a
    stream's is) and ClientGone raised."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone
    finally:
        gone.cancel()
        task.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (a chunked body declares no length up front)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def held(slot: Slot, work: Awaitable[T]) -> T:
    """`work`'s result, the slot given back however it ends (a task cancelled before it started never ran the
    `finally` of the generator that holds the slot)."""
    try:
        return await work
    finally:
        slot.release()
