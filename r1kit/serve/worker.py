"""The engine on a background thread: requests from many clients are batched into each step.

Only that thread calls the engine. Clients' requests and aborts reach it through an inbox it empties
between steps, so the server's event loop never waits for a step to end (with a lock, a fast engine
loop that releases and retakes it at once can keep a submitter, and with it every stream, waiting).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple

from r1kit.rollout.engine import LLMEngine
from r1kit.rollout.engine.scheduler import Request
from r1kit.rollout.engine.sequence import Sequence
from r1kit.rollout.types import SamplingParams

log = logging.getLogger("r1kit.serve")

def freeze_heap() -> None:
    """Collect, then move every object alive into the permanent generation, once the process is ready to serve:
    the garbage collector's full collections then walk what serving allocates, not the ~400k objects that torch,
    transformers and the app leave behind (one such collection takes ~0.2 s on a 2-core CPU, a stall of every
    stream; vLLM freezes its heap after warm-up for the same reason)."""
    gc.collect()
    gc.freeze()


def warm_engine(spec: str, device: str, kv_cache_tokens: int, prefill_chunk_tokens: int) -> LLMEngine:
    """A serving engine for a model: loaded and warmed up. It prefills at most prefill_chunk_tokens prompt tokens
    a step: a longer prompt (or burst of prompts) takes several steps, a decode step of the running streams between
    each two, so it delays their next token by one chunk's prefill. The packed prefill (contexts past 1,024 tokens)
    stays eager: compiling it took 43 s of a 110 s warm-up on an H200, for steps that measured ~20 ms faster in one
    session and ~25 ms slower in the next (same-call A/Bs of four prompt shapes)."""
    from r1kit.models import load_model

    model, tokenizer = load_model(spec, device)
    engine = LLMEngine(model, tokenizer, kv_cache_tokens=kv_cache_tokens, max_prefill_tokens=prefill_chunk_tokens)
    parts = engine.warmup()
    log.info("engine warm-up: %s", ", ".join(f"{part} {seconds:.1f} s" for part, seconds in parts.items()))
    return engine


class StepStats:
    """The engine's throughput over a window, prefill and decode steps apart, for a periodic log line (as
    vLLM logs its own)."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.started, self.tokens = now, 0
        self.kinds: dict[str, list[float]] = {}  # kind -> [steps, busy seconds, longest seconds]

    def record(self, kind: str, seconds: float, tokens: int) -> None:
        self.tokens += tokens
        steps, busy, longest = self.kinds.get(kind, (0, 0.0, 0.0))
        self.kinds[kind] = [steps + 1, busy + seconds, max(longest, seconds)]

    def line(self, running: int, waiting: int) -> str | None:
        """A summary of the window once it is over (then a new one starts), else None."""
        now = time.perf_counter()
        window = now - self.started
        if window < self.every_s or not self.kinds:
            return None
        kinds = ", ".join(f"{steps:.0f} {kind} steps {1000 * busy / steps:.1f} ms mean ({1000 * longest:.0f} max)"
                          for kind, (steps, busy, longest) in sorted(self.kinds.items()))
        busy = sum(kind[1] for kind in self.kinds.values())
        text = (f"engine: {self.tokens / window:.0f} tokens/s, {kinds}, busy {busy / window:.0%}, "
                f"running {running}, waiting {waiting}")
        self._reset(now)
        return text


class Event(NamedTuple):
    """One sequence's progress in one engine step: its new token, and how and with what text it ended. A tuple: an
    engine process sends a step's events up a pipe as plain tuples, which pickle ~10x faster than objects."""

    index: int
    token: int
    finish_reason: str | None
    text: str


Listener = Callable[[list[Event] | Exception], None]


@dataclass(frozen=True)
class EngineLoad:
    """What the engine holds now: requests running and waiting, and the share of KV blocks in use (a request's
    blocks are reserved in full when it is admitted, so this counts prompt + max_tokens of each running one)."""

    running: int
    waiting: int
    kv_usage: float


def engine_load(engine: LLMEngine) -> EngineLoad:
    """The engine's load, read from another thread: copies first, as its thread may change them meanwhile."""
    running = {seq.request_id for seq in list(engine.scheduler.running)}
    blocks = engine.blocks
    return EngineLoad(len(running), len(engine.scheduler.waiting), 1 - len(blocks.free) / len(blocks.refs))


@dataclass(eq=False)
class Submission:
    """A request on its way to the engine thread; `request` once the engine has it."""

    prompt_ids: list[int]
    params: SamplingParams
    listener: Listener
    request: Request | None = None
    aborted: bool = False
    sid: int = -1  # its id in the engine process (EngineProcess)


class Mailbox:
    """Calls for one event loop from other threads, run there in batches: a step's events for 64 streams wake the
    loop once, where a `call_soon_threadsafe` each would write its self-pipe 64 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[Callable, object]] = []

    def post(self, fn: Callable, arg: object) -> None:
        """Have the loop call fn(arg), after the calls posted before it."""
        with self.lock:
            self.pending.append((fn, arg))
            if len(self.pending) > 1:  # a drain is scheduled already and has not run
                return
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        for fn, arg in batch:
            fn(arg)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's Mailbox (one a loop, made on first use; called on the loop)."""
    if loop not in _MAILBOXES:
        _MAILBOXES[loop] = Mailbox(loop)
    return _MAILBOXES[loop]


class Worker:
    """What the app streams from: requests go in with `submit` and `abort`, their events come back to a
    listener from another thread. EngineWorker runs the engine on a thread of this process; EngineProcess
    (serve/process.py) in a process of its own."""

    max_len: int  # the engine's context: prompt + max_tokens must fit

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Listener) -> Submission:
        raise NotImplementedError

    def abort(self, submission: Submission) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        """Whether the engine still runs (its thread or process has not died)."""
        raise NotImplementedError

    def load(self) -> EngineLoad:
        """What the engine holds now, for /metrics."""
        raise NotImplementedError

    async def stream(self, prompts: list[list[int]], params: SamplingParams, interval: float = 0.0
                     ) -> AsyncIterator[tuple[int, list[Event]]]:
        """(prompt index, events) of one request per prompt as they come, at most once every `interval` seconds
        (what arrives meanwhile comes merged); leaving early aborts them all."""
        box = mailbox(asyncio.get_running_loop())
        arrived: asyncio.Queue[tuple[int, list[Event] | Exception]] = asyncio.Queue()

        def listener(i: int) -> Listener:
            return lambda events: box.post(arrived.put_nowait, (i, events))

        submissions = [self.submit(ids, params, listener(i)) for i, ids in enumerate(prompts)]
        remaining = params.n * len(prompts)
        try:
            while remaining:
                for i, events in _drained(await arrived.get(), arrived):
                    remaining -= sum(e.finish_reason is not None for e in events)
                    yield i, events
                if interval and remaining:
                    # the event loop's work is per chunk: a chunk each engine step of 64 fast streams would keep it
                    # busy, and new requests would wait behind them for their first token
                    await asyncio.sleep(interval)
        finally:
            if remaining:
                for submission in submissions:
                    self.abort(submission)


class EngineWorker(Worker):
    """Runs `engine.step()` in a loop on its own thread; each request's events go to its callback, and
    `flush` (if given) is called once a loop, after the callbacks (to send what they gathered)."""

    def __init__(self, engine: LLMEngine, flush: Callable[[], None] | None = None):
        self.engine, self.flush, self.max_len = engine, flush, engine.decoder.max_len
        self.lock = threading.Lock()  # held through each step: another thread may read the engine between steps
        self.wakeup = threading.Event()
        self.listeners: dict[int, tuple[Request, Listener]] = {}
        self.inbox: queue.SimpleQueue[Submission] = queue.SimpleQueue()
        # requests the engine has that no step has advanced yet: when a prefill fails, the cause is among them
        self.fresh: dict[int, Submission] = {}
        # after a prefill of several fresh requests failed: requests admitted one at a time, each alone in its
        # prefill, so that the next failure names its cause and the others are served (see _step_failed)
        self.suspects: deque[Submission] = deque()
        self.running = True
        self.stats = StepStats()
        self.thread = threading.Thread(target=self._loop, name="r1kit-engine", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Listener) -> Submission:
        """Queue a request; `listener` is called from the engine thread after every step that advanced it, or
        once with the error that ended it (the engine refused it, or a step failed)."""
        submission = Submission(prompt_ids, params, listener)
        self.inbox.put(submission)
        self.wakeup.set()
        return submission

    def abort(self, submission: Submission) -> None:
        """Stop a request whose client went away (the engine thread does it between steps)."""
        submission.aborted = True
        self.inbox.put(submission)
        self.wakeup.set()

    def _take_inbox(self) -> None:
        while True:
            try:
                submission = self.inbox.get_nowait()
            except queue.Empty:
                return
            if submission.aborted:  # before the engine took it, or after: then it stops there
                if submission.request is not None:
                    self._drop(submission.request)
                continue
            if self.suspects:
                self.suspects.append(submission)  # new requests wait their turn until the cause is found
            else:
                self._add(submission)

    def _add(self, submission: Submission) -> None:
        """Give a request to the engine, or its listener the ValueError that refuses it."""
        if submission.aborted:
            return
        try:
            if not submission.prompt_ids:  # validated here too: an empty prompt fails the whole prefill step
                raise ValueError("the prompt is empty")
            submission.request = self.engine.add_request(submission.prompt_ids, submission.params)
        except ValueError as error:
            submission.listener(error)
            return
        self.listeners[submission.request.id] = (submission.request, submission.listener)
        self.fresh[submission.request.id] = submission

    def _drop(self, request: Request) -> None:
        self.engine.abort(request)
        self.listeners.pop(request.id, None)
        self.fresh.pop(request.id, None)

    def _admit_suspect(self) -> None:
        """While suspects wait, admit the next once the engine holds no request that has not yet stepped."""
        if self.suspects and not self.fresh:
            self._add(self.suspects.popleft())

    def close(self) -> None:
        self.running = False
        self.wakeup.set()
        self.thread.join(timeout=5)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def load(self) -> EngineLoad:
        return engine_load(self.engine)

    def _step_failed(self, error: Exception) -> list[Sequence]:
        """A step raised; the sequences that still got its token. A decode step is retried by the engine in
        halves, so that only the requests whose own sequences fail end (see _decode_failed). A prefill fails for
        something in the requests it admitted, none of which has a token yet: one alone is ended with the error;
        several are taken back (nobody has seen a token of theirs) and retried one per prefill, so only the
        culprit fails."""
        if self.engine.last_step == "decode":
            return self._decode_failed(error)
        waiting = set(map(id, self.engine.scheduler.waiting))
        admitted = [s for s in self.fresh.values() if id(s.request) not in waiting]
        if self.engine.last_step != "prefill" or not admitted:
            self._fail_all(error)
        elif len(admitted) == 1:
            log.exception("engine prefill failed; ending the request that caused it")
            self._drop(admitted[0].request)
            admitted[0].listener(error)
        else:
            log.warning("engine prefill of %d new requests failed (%s: %s); retrying them one at a time",
                        len(admitted), type(error).__name__, error)
            for submission in reversed(admitted):
                self._drop(submission.request)
                submission.request = None
                self.suspects.appendleft(submission)
        return []

    def _decode_failed(self, error: Exception) -> list[Sequence]:
        """End each request a sequence of which fails its decode step alone, with that sequence's error (its
        siblings are aborted, their blocks freed); the sequences the retried step advanced."""
        advanced, failed = self.engine.isolate_failure(error)
        log.warning("engine decode step failed (%s: %s); %d sequences fail alone", type(error).__name__, error,
                    len(failed))
        for seq, seq_error in failed:
            if seq.request_id in self.listeners:  # not yet ended by a sibling that failed too
                request, listener = self.listeners[seq.request_id]
                log.error("ending request %d: its sequence %d fails its decode step", request.id, seq.index,
                          exc_info=seq_error)
                self._drop(request)
                listener(seq_error)
        return advanced

    def _fail_all(self, error: Exception) -> None:
        """End every request in flight with the error and free the engine for new ones."""
        log.exception("engine step failed; ending the %d requests in flight", len(self.listeners))
        for request, listener in self.listeners.values():
            self.engine.abort(request)
            listener(error)
        self.listeners.clear()
        self.fresh.clear()

    def _loop(self) -> None:
        while self.running:
            with self.lock:
                self._take_inbox()
                self._admit_suspect()
                started, stepped = time.perf_counter(), self.engine.has_work()
                try:
                    advanced = self.engine.step() if stepped else []
                except Exception as error:  # noqa: BLE001 - the thread must outlive any one bad step
                    advanced = self._step_failed(error)
                if stepped:  # a step of prompt chunks advances no sequence, and takes time all the same
                    self.stats.record(self.engine.last_step, time.perf_counter() - started, len(advanced))
                    line = self.stats.line(len(self.engine.scheduler.running), len(self.engine.scheduler.waiting))
                    if line:
                        log.info(line)
                by_request: dict[int, list[Event]] = {}
                for seq in advanced:
                    self.fresh.pop(seq.request_id, None)
                    by_request.setdefault(seq.request_id, []).append(
                        Event(seq.index, seq.output_ids[-1], seq.finish_reason, seq.text))
                calls = []
                for rid, events in by_request.items():
                    request, listener = self.listeners.get(rid, (None, None))
                    if listener is not None:
                        calls.append((listener, events))
                        if all(seq.finished for seq in request.sequences):
                            del self.listeners[rid]
            # idle: nothing stepped and nothing to step (a step that only drops rows run ahead is not idle)
            if not advanced and not self.engine.has_work() and not self.suspects:
                self.wakeup.wait(0.05)
                self.wakeup.clear()
            for listener, events in calls:
                listener(events)
            if self.flush:
                self.flush()


def _drained(first: tuple[int, list[Event] | Exception], arrived: asyncio.Queue) -> list[tuple[int, list[Event]]]:
    """`first` and whatever else has arrived, the events of each prompt merged in order: a client that falls
    behind the engine gets several tokens a chunk instead of falling further behind, chunk by chunk."""
    merged: dict[int, list[Event]] = {}
    item = first
    while True:
        i, events = item
        if isinstance(events, Exception):
            raise events
        merged.setdefault(i, []).extend(events)
        try:
            item = arrived.get_nowait()
        except asyncio.QueueEmpty:
            return list(merged.items())
