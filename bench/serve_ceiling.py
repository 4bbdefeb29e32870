"""Where serving's time goes: `r1kit serve`'s app and engine thread, loaded like `serve_load.py`, in one
process, around a fake engine (its step takes a fixed time and emits one token per running sequence) or the
real one (`--model`), through HTTP or straight into the engine thread (`--direct`). Fake engine vs real,
HTTP vs direct: which of the engine, the thread around it and the HTTP/SSE side limits tokens/s.
  python bench/serve_ceiling.py --step-ms 2 --clients 64 --requests 128 --max-tokens 128
  python bench/serve_ceiling.py --model default --direct --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from types import SimpleNamespace

from bench_io import emit
from serve_load import figures, question, run

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
        self._next, self.last_step = 0, "decode"

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


async def direct(worker, tokenizer, clients: int, requests: int, max_tokens: int) -> dict:
    """serve_load's workload and figures, each request streamed straight from the engine thread."""
    from r1kit.rollout.types import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=1.0)
    queue, results = list(range(requests)), []

    async def client() -> None:
        while queue:
            i = queue.pop()
            prompt = tokenizer.apply_chat_template(question(i), add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
            started, first, tokens = time.perf_counter(), None, 0
            async for _, events in worker.stream([list(prompt)], params):
                first = first if first is not None else time.perf_counter() - started
                tokens += len(events)
            results.append({"ttft": first, "tokens": tokens})

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"clients": clients, "requests": requests, "max_tokens": max_tokens,
            **figures(results, time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step-ms", type=float, default=2.0, help="the fake engine's time waiting on the 'GPU'")
    parser.add_argument("--host-ms", type=float, default=0.0, help="its Python time per step (holding the GIL)")
    parser.add_argument("--waits", type=int, default=1, help="GIL releases per step")
    parser.add_argument("--model", help="the real engine of this model ('default', .gguf, HF folder) instead")
    parser.add_argument("--device", default="auto", help="with --model")
    parser.add_argument("--direct", action="store_true", help="no HTTP: clients stream from the engine thread")
    parser.add_argument("--procs", type=int, default=1, help="client processes (HTTP only)")
    parser.add_argument("--client", choices=["raw", "openai"], default="raw", help="serve_load.py's --client")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--no-freeze", action="store_true", help="leave the garbage collector's heap as it is (the "
                        "server freezes it once ready): what that freeze changes")
    parser.add_argument("--stream-interval-ms", type=float, default=ServeConfig().stream_interval_ms,
                        help="the server's --stream-interval-ms: a stream's chunks at most this often")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from r1kit.models import resolve_model
    from r1kit.serve.app import ServedModel, create_app
    from r1kit.serve.server import free_port, load_served, serve_in_thread
    from r1kit.serve.worker import EngineWorker, freeze_heap

    if args.model:
        served = load_served(args.model, None, args.device, 65_536, 2048)
        worker, tokenizer = served.worker, served.tokenizer
        setup = {"model": args.model}
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
        worker = EngineWorker(FakeEngine(tokenizer, args.step_ms / 1000, args.host_ms / 1000, args.waits))
        served = ServedModel("fake", worker, tokenizer, "0" * 64, "", 0)
        setup = {"step_ms": args.step_ms, "host_ms": args.host_ms, "waits": args.waits}
    logging.basicConfig(format="%(message)s")
    logging.getLogger("r1kit.serve").setLevel(logging.INFO)  # the engine's tokens/s lines, not every request
    if args.direct:
        try:
            result = asyncio.run(direct(worker, tokenizer, args.clients, args.requests, args.max_tokens))
        finally:
            worker.close()
        emit({**setup, "http": False, **result}, args.out)
        return
    app = create_app([served], ServeConfig(max_concurrent=10_000, stream_interval_ms=args.stream_interval_ms))
    setup["stream_interval_ms"] = args.stream_interval_ms
    if not args.no_freeze:
        freeze_heap()  # as `r1kit serve` does once it is ready
    port = free_port()
    server, thread = serve_in_thread(app, port)
    try:
        result = run(f"http://127.0.0.1:{port}", "none", args.clients, args.requests, args.max_tokens, 600, args.procs,
                     args.client)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.close()
    emit({**setup, "http": True, **result}, args.out)


if __name__ == "__main__":
    main()
