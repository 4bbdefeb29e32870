"""The serving layer's own ceiling: `r1kit serve`'s app and engine thread around a fake engine whose step
takes a fixed time and emits one token per running sequence, loaded like `serve_load.py`. Compared with a
real run, it tells whether the HTTP/SSE side or the engine limits tokens/s.
  python bench/serve_ceiling.py --step-ms 2 --clients 64 --requests 128 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace

from bench_io import emit
from serve_load import run

from r1kit.config import ServeConfig
from r1kit.rollout.engine.scheduler import Request
from r1kit.rollout.engine.sequence import Sequence


class FakeEngine:
    """LLMEngine's surface for EngineWorker: each step holds the GIL for `host_s` (the engine's Python work),
    then waits `step_s` in `waits` sleeps (releasing the GIL, as waits on the GPU do), and appends one token
    to every running sequence."""

    def __init__(self, tokenizer, step_s: float, host_s: float = 0.0, waits: int = 1, token: int = 28):
        self.tokenizer, self.step_s, self.host_s, self.waits, self.token = tokenizer, step_s, host_s, waits, token
        self.decoder = SimpleNamespace(max_len=8192)
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self._next = 0

    def add_request(self, prompt_ids: list[int], params) -> Request:
        seqs = [Sequence(self._next, i, list(prompt_ids), params, 0) for i in range(params.n)]
        self._next += 1
        self.scheduler.running += seqs
        return Request(self._next - 1, seqs, False)

    def abort(self, request: Request) -> None:
        self.scheduler.running = [s for s in self.scheduler.running if s not in request.sequences]

    def has_work(self) -> bool:
        return bool(self.scheduler.running)

    def step(self) -> list[Sequence]:
        until = time.perf_counter() + self.host_s
        while time.perf_counter() < until:
            pass
        for _ in range(self.waits):
            time.sleep(self.step_s / self.waits)
        advanced = list(self.scheduler.running)
        for seq in advanced:
            seq.output_ids.append(self.token)
            if len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason, seq.text = "length", self.tokenizer.decode(seq.output_ids)
        self.scheduler.running = [s for s in advanced if not s.finished]
        return advanced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=2.0, help="the fake engine's time waiting on the 'GPU'")
    parser.add_argument("--host-ms", type=float, default=0.0, help="its Python time per step (holding the GIL)")
    parser.add_argument("--waits", type=int, default=1, help="GIL releases per step")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from r1kit.models import resolve_model
    from r1kit.serve.app import ServedModel, create_app
    from r1kit.serve.server import free_port, serve_in_thread
    from r1kit.serve.worker import EngineWorker

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    worker = EngineWorker(FakeEngine(tokenizer, args.step_ms / 1000, args.host_ms / 1000, args.waits))
    app = create_app([ServedModel("fake", worker, tokenizer, "0" * 64, "", 0)], ServeConfig(max_concurrent=10_000))
    port = free_port()
    server, thread = serve_in_thread(app, port)
    try:
        result = asyncio.run(run(f"http://127.0.0.1:{port}", "none", args.clients, args.requests, args.max_tokens, 600))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.close()
    emit({"step_ms": args.step_ms, "host_ms": args.host_ms, "waits": args.waits, **result}, args.out)


if __name__ == "__main__":
    main()
