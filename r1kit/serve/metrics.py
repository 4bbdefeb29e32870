"""`GET /metrics`: the server's Prometheus metrics.

Where vLLM has a metric, r1kit's has its name with the `r1kit:` prefix for `vllm:` (`r1kit:num_requests_running`
is `vllm:num_requests_running`), the same type and the same `model_name` label, so a dashboard built for vLLM reads
it after a prefix swap. The gate's verdicts and escalations to the upstream are r1kit's own.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from r1kit.serve.worker import Event, Worker

PREFIX = "r1kit:"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# vLLM's buckets, with finer ones below 10 ms: a small model's token takes about 1 ms
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
MODEL = ("model_name",)


class Metrics:
    """The metrics of one app, in a registry of its own (the global one would mix several apps in one process)."""

    def __init__(self, workers: dict[str, Worker]):
        self.registry = registry = CollectorRegistry()
        for name, doc, field in (("num_requests_running", "Requests in the engine's running batch.", "running"),
                                 ("num_requests_waiting", "Requests waiting for the engine to admit them.", "waiting"),
                                 ("kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = all).", "kv_usage")):
            gauge = Gauge(PREFIX + name, doc, MODEL, registry=registry)
            for model, worker in workers.items():  # read at each scrape
                gauge.labels(model).set_function(_reading(worker, field))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", MODEL, registry=registry)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", MODEL, registry=registry)
        self.success = Counter(PREFIX + "request_success", "Sequences ended, by finish reason (stop, length, abort, "
                               "error).", (*MODEL, "finished_reason"), registry=registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from a request's submission to the "
                              "engine to its first token.", MODEL, buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between a sequence's tokens.", MODEL,
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from a request's submission to the "
                             "engine to its last token.", MODEL, buckets=E2E_BUCKETS, registry=registry)
        self.gate = Counter(PREFIX + "gate_verdicts", "The gate's verdicts on its samples.", (*MODEL, "confident"),
                            registry=registry)
        self.escalations = Counter(PREFIX + "escalations", "Requests sent to the upstream, by why (disagreement: the "
                                   "gate's samples did not agree; route: the router picked it) and outcome "
                                   "(answered, failed: a local answer came back instead).", ("reason", "outcome"),
                                   registry=registry)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    async def observed(self, model: str, prompt_tokens: int, sequences: int, events: AsyncIterator
                       ) -> AsyncIterator[tuple[int, list[Event]]]:
        """`events` (a request's, from Worker.stream) passed through, its tokens and timings counted on the way.

        A few microseconds a batch: the label lookups are made once a request, not once a token."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        generated, itl = self.generation_tokens.labels(model), self.itl.labels(model)
        started = time.perf_counter()
        last: dict[int, float] = {}  # prompt index -> when its previous batch came
        left, reason = sequences, "abort"
        try:
            async for p, batch in events:
                now = time.perf_counter()
                generated.inc(len(batch))
                if not last:
                    self.ttft.labels(model).observe(now - started)
                elif p in last:
                    _observe_gaps(itl, batch, now - last[p])
                last[p] = now
                left -= self._ended(model, batch)
                yield p, batch
        except Exception:
            reason = "error"
            raise
        finally:
            if left:
                self.success.labels(model, reason).inc(left)
            else:
                self.e2e.labels(model).observe(time.perf_counter() - started)

    def _ended(self, model: str, batch: list[Event]) -> int:
        """Count the sequences this batch ends, by finish reason; how many it ends."""
        ended = [event.finish_reason for event in batch if event.finish_reason is not None]
        for reason in ended:
            self.success.labels(model, reason).inc()
        return len(ended)


def _observe_gaps(itl: Histogram, batch: list[Event], gap: float) -> None:
    """The gap since a prompt's previous batch, spread over the engine steps this one holds (a client that fell
    behind gets several tokens of a sequence a batch)."""
    steps = 1 if len(batch) == 1 else max(Tally(event.index for event in batch).values())
    for _ in range(steps):
        itl.observe(gap / steps)


def _reading(worker: Worker, field: str) -> Callable[[], float]:
    return lambda: getattr(worker.load(), field)
