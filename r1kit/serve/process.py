"""The engine in a process of its own, so that its loop and the server's never share one interpreter lock.

On a GPU a decode step of 64 sequences takes ~2 ms; in the server's process the engine thread waited for the
lock while the event loop wrote 64 streams' chunks, and steps took 6 ms. Here the child process loads the
model and runs an EngineWorker; requests and aborts go to it down one pipe, and each step's events come back
up another, in one message a step.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Callable

from r1kit.rollout.types import SamplingParams
from r1kit.serve.worker import (
    EngineLoad,
    EngineWorker,
    Event,
    Listener,
    Submission,
    Worker,
    engine_load,
    freeze_heap,
    warm_engine,
)

LOAD_EVERY_S = 0.5  # how often the child reports its load: often enough for a scrape, rare next to ~2 ms steps


class EngineError(RuntimeError):
    """An error the engine process raised, by name and message (its exceptions need not unpickle here)."""


def _as_error(kind: str, message: str) -> Exception:
    return ValueError(message) if kind == "ValueError" else EngineError(f"{kind}: {message}")


def _engine_main(spec: str, device: str, kv_cache_tokens: int, prefill_chunk_tokens: int, inbox, outbox) -> None:
    """The child: load the model, warm the engine up, say ready, then serve the pipe until told to close."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server shuts this down
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # the stats lines
    try:
        engine = warm_engine(spec, device, kv_cache_tokens, prefill_chunk_tokens)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.send(("failed", type(error).__name__, str(error)))
        return
    freeze_heap()
    outgoing: list[tuple[int, list[Event] | tuple[str, str]]] = []
    reported = [0.0]  # when the load last went up with a message

    def flush() -> None:
        # the load rides along with the events, or alone while idle (the loop comes by every 50 ms then)
        now = time.monotonic()
        load = engine_load(engine) if now - reported[0] >= LOAD_EVERY_S else None
        if load is not None:
            reported[0] = now
        if outgoing or load is not None:
            outbox.send(("events", outgoing.copy(), load))
            outgoing.clear()

    worker = EngineWorker(engine, flush)
    submissions: dict[int, Submission] = {}

    def collect(sid: int) -> Listener:
        def call(events: list[Event] | Exception) -> None:
            outgoing.append((sid, (type(events).__name__, str(events)) if isinstance(events, Exception)
                             else [tuple(e) for e in events]))

        return call

    outbox.send(("ready", engine.decoder.max_len))
    while True:
        try:
            message = inbox.recv()
        except EOFError:  # the server is gone
            message = ("close",)
        if message[0] == "submit":
            _, sid, prompt_ids, params = message
            submissions[sid] = worker.submit(prompt_ids, params, _counting(collect(sid), params.n,
                                                                           lambda sid=sid: submissions.pop(sid, None)))
        elif message[0] == "abort" and message[1] in submissions:
            worker.abort(submissions.pop(message[1]))
        elif message[0] == "close":
            worker.close()
            return


class EngineProcess(Worker):
    """A Worker whose engine runs in a child process (spawned: CUDA cannot be forked)."""

    def __init__(self, spec: str, device: str, kv_cache_tokens: int, prefill_chunk_tokens: int,
                 start_timeout_s: float = 900):
        context = multiprocessing.get_context("spawn")
        self._inbox, child_inbox = context.Pipe(duplex=False)[::-1]
        child_outbox, self._outbox = context.Pipe(duplex=False)[::-1]
        self.process = context.Process(target=_engine_main, name="r1kit-engine", daemon=True,
                                       args=(spec, device, kv_cache_tokens, prefill_chunk_tokens, child_inbox,
                                             child_outbox))
        self.process.start()
        child_inbox.close()  # the child's ends: with them closed here, its exit reads as EOF and a broken pipe
        child_outbox.close()
        if not self._outbox.poll(start_timeout_s):
            self.process.kill()
            raise RuntimeError(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            first = self._outbox.recv()
        except EOFError:  # it died without a word: a crash, or the OOM killer
            self.process.join(timeout=10)
            raise EngineError(f"the engine process exited while loading {spec} (exit code "
                              f"{self.process.exitcode})") from None
        if first[0] == "failed":
            raise _as_error(first[1], f"the engine process could not load {spec}: {first[2]}")
        self.max_len = first[1]
        self._load = EngineLoad(0, 0, 0.0)  # as the child last reported it
        self._listeners: dict[int, Callable[[list[Event] | Exception], None]] = {}
        self._send_lock = threading.Lock()  # submits and aborts come from the event loop and request threads
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="r1kit-engine-reader", daemon=True)
        self._reader.start()

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._post(message)

    def _post(self, message: tuple) -> None:
        try:
            self._inbox.send(message)
        except OSError as error:
            raise EngineError("the engine process has exited") from error

    def submit(self, prompt_ids: list[int], params: SamplingParams, listener: Listener) -> Submission:
        """Send a request to the engine process; `listener` gets its events from the reader thread."""
        submission = Submission(prompt_ids, params, listener)
        with self._send_lock:
            sid, self._next_id = self._next_id, self._next_id + 1
            submission.sid = sid
            self._listeners[sid] = _counting(listener, params.n, lambda: self._listeners.pop(sid, None))
            try:
                self._post(("submit", sid, prompt_ids, params))
            except EngineError:
                self._listeners.pop(sid, None)
                raise
        return submission

    def abort(self, submission: Submission) -> None:
        """Stop a request whose client went away."""
        submission.aborted = True
        self._listeners.pop(submission.sid, None)
        with contextlib.suppress(EngineError):  # a gone engine has stopped it already
            self._send(("abort", submission.sid))

    def _read(self) -> None:
        while True:
            try:
                _, batch, load = self._outbox.recv()
            except (EOFError, OSError):  # the child is gone: end whatever was in flight
                for listener in list(self._listeners.values()):
                    listener(EngineError("the engine process has exited"))
                self._listeners.clear()
                return
            self._load = load or self._load
            for sid, events in batch:
                listener = self._listeners.get(sid)
                if listener is not None:
                    listener(_as_error(*events) if isinstance(events, tuple) else [Event._make(e) for e in events])

    def alive(self) -> bool:
        return self.process.is_alive()

    def load(self) -> EngineLoad:
        return self._load

    def close(self) -> None:
        with contextlib.suppress(EngineError):
            self._send(("close",))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def _counting(listener: Listener, n: int, done: Callable[[], None]) -> Listener:
    """`listener`, calling `done` once its request's n sequences have ended (or an error ended them)."""
    left = [n]

    def call(events: list[Event] | Exception) -> None:
        listener(events)
        left[0] = 0 if isinstance(events, Exception) else left[0] - sum(e.finish_reason is not None for e in events)
        if not left[0]:
            done()

    return call
