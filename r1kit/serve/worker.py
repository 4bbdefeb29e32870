"""The engine on a background thread: requests from many clients are batched into each step."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from r1kit.rollout.engine import LLMEngine
from r1kit.rollout.engine.scheduler import Request
from r1kit.rollout.types import SamplingParams

log = logging.getLogger("r1kit.serve")


class StepStats:
    """The engine's throughput over a window, for a periodic log line (as vLLM logs its own)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.started, self.steps, self.tokens, self.busy_s, self.longest_s = now, 0, 0, 0.0, 0.0

    def record(self, seconds: float, tokens: int) -> None:
        self.steps, self.tokens, self.busy_s = self.steps + 1, self.tokens + tokens, self.busy_s + seconds
        self.longest_s = max(self.longest_s, seconds)

    def line(self, running: int, waiting: int) -> str | None:
        """A summary of the window once it is over (then a new one starts), else None."""
        now = time.perf_counter()
        window = now - self.started
        if window < self.every_s or not self.steps:
            return None
        text = (f"engine: {self.tokens / window:.0f} tokens/s, {self.steps / window:.0f} steps/s, step "
                f"{1000 * self.busy_s / self.steps:.1f} ms mean ({1000 * self.longest_s:.0f} max), busy "
                f"{self.busy_s / window:.0%}, running {running}, waiting {waiting}")
        self._reset(now)
        return text


@dataclass(frozen=True)
class Event:
    """One sequence's progress in one engine step: its new token, and how and with what text it ended."""

    index: int
    token: int
    finish_reason: str | None
    text: str


class EngineWorker:
    """Runs `engine.step()` in a loop on its own thread; each request's events go to its callback."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wakeup = threading.Event()
        self.listeners: dict[int, tuple[Request, Callable[[list[Event]], None]]] = {}
        self.running = True
        self.stats = StepStats()
        self.thread = threading.Thread(target=self._loop, name="r1kit-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Callable[[list[Event]], None]
               ) -> Request:
        """Queue a request; `listener` is called from the engine thread after every step that advanced it."""
        with self.lock:
            request = self.engine.add_request(prompt_ids, params)
            self.listeners[request.id] = (request, listener)
        self.wakeup.set()
        return request

    def abort(self, request: Request) -> None:
        """Stop a request whose client went away."""
        with self.lock:
            self.engine.abort(request)
            self.listeners.pop(request.id, None)

    def close(self) -> None:
        self.running = False
        self.wakeup.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while self.running:
            with self.lock:
                started = time.perf_counter()
                advanced = self.engine.step() if self.engine.has_work() else []
                if advanced:
                    self.stats.record(time.perf_counter() - started, len(advanced))
                    line = self.stats.line(len(self.engine.scheduler.running), len(self.engine.scheduler.waiting))
                    if line:
                        log.info(line)
                by_request: dict[int, list[Event]] = {}
                for seq in advanced:
                    by_request.setdefault(seq.request_id, []).append(
                        Event(seq.index, seq.output_ids[-1], seq.finish_reason, seq.text))
                calls = []
                for rid, events in by_request.items():
                    request, listener = self.listeners.get(rid, (None, None))
                    if listener is not None:
                        calls.append((listener, events))
                        if all(seq.finished for seq in request.sequences):
                            del self.listeners[rid]
            if not advanced:
                self.wakeup.wait(0.05)
                self.wakeup.clear()
            for listener, events in calls:
                listener(events)

    async def stream(self, prompts: list[list[int]], params: SamplingParams
                     ) -> AsyncIterator[tuple[int, list[Event]]]:
        """(prompt index, events) of one request per prompt as they come; leaving early aborts them all."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, list[Event]]] = asyncio.Queue()

        def listener(i: int) -> Callable[[list[Event]], None]:
            return lambda events: loop.call_soon_threadsafe(queue.put_nowait, (i, events))

        requests = [self.submit(ids, params, listener(i)) for i, ids in enumerate(prompts)]
        remaining = params.n * len(prompts)
        try:
            while remaining:
                i, events = await queue.get()
                remaining -= sum(e.finish_reason is not None for e in events)
                yield i, events
        finally:
            if remaining:
                for request in requests:
                    self.abort(request)
