"""Load test of `r1kit serve` on 127.0.0.1: N concurrent streaming clients, a bounded number of requests.

Reports errors, time to first token (p50/p99), generated tokens/s and requests/s, then exits. The clients read
the SSE stream with httpx and json (`--client raw`, the default), or through the OpenAI SDK (`--client openai`),
whose per-chunk pydantic objects cost ~0.7 ms of the clients' CPU a chunk: at 64 streams in one process the SDK,
not the server, was where the time went (cProfile of serve_ceiling.py on the CPU).
  python bench/serve_load.py --model default --clients 64 --requests 256 --max-tokens 128 --procs 4
  python bench/serve_load.py --model tiny --device cpu --max-tokens 64
  python bench/serve_load.py --url http://127.0.0.1:8000 --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator

from bench_io import emit


def tiny_model() -> str:
    """A 2-layer random Llama (hidden 64) with the embedded model's tokenizer, in a temp folder."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from r1kit.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("default"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tempfile.mkdtemp(prefix="r1kit-tiny-")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def start_local(model: str, device: str, kv_cache_tokens: int, log_path: str | None = None, timeout_s: float = 300):
    """`r1kit serve` in its own process (so the load generator does not share its interpreter); (url, process)."""
    import subprocess
    import sys
    import urllib.request

    from r1kit.serve.server import free_port

    port = free_port()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "r1kit.cli", "serve", "--model", model, "--device", device,
                             "--port", str(port), "--kv-cache-tokens", str(kv_cache_tokens),
                             "--max-concurrent", "10000"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url + "/health").close()
            return url, proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.2)


def question(i: int) -> list[dict[str, str]]:
    """The i-th request's conversation."""
    return [{"role": "user", "content": f"Question {i}: what is {i} + {2 * i + 7}? Explain."}]


def percentile(values: list[float], share: float) -> float | None:
    """The value below which `share` of the values lie (None for none)."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 3) if ordered else None


def figures(results: list[dict], wall: float, first_wave: int = 0) -> dict:
    """Time to first token (p50, p99, max), tokens and rates of finished requests ({"ttft", "tokens", "start"}
    each); the TTFT p99 again without the `first_wave` requests that started first (all clients at once)."""
    ttft = [r["ttft"] for r in results]
    later = [r["ttft"] for r in sorted(results, key=lambda r: r.get("start", 0))[first_wave:]]
    tokens = sum(r["tokens"] for r in results)
    return {"wall_s": round(wall, 2), "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "ttft_max_s": percentile(ttft, 1.0), "ttft_p99_s_after_first_wave": percentile(later, 0.99),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(results) / wall, 2)}


def ttft_buckets(url: str, api_key: str) -> list[tuple[float, float]]:
    """The server's time-to-first-token histogram from /metrics: (upper bound, cumulative count) of each bucket."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request) as response:
        text = response.read().decode()
    return sorted((float(s.labels["le"]), s.value) for family in text_string_to_metric_families(text)
                  if family.name == "r1kit:time_to_first_token_seconds" for s in family.samples
                  if s.name.endswith("_bucket"))


def server_ttft(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> dict:
    """The server's own time to first token over a load (from a request's submission to the engine until its first
    token reaches the event loop: the histogram's counts after the load less those before it, so that a server that
    served earlier loads reports this one's), as the upper bounds of the buckets holding its p50 and p99; set beside
    the clients' figures, it tells the engine and hand-off's share from the HTTP side's and the clients' own."""
    counts = dict(before)
    buckets = [(le, count - counts.get(le, 0)) for le, count in after]
    total = buckets[-1][1] if buckets else 0
    if not total:
        return {}
    return {f"server_ttft_{name}_le_s": next(le for le, count in buckets if count >= share * total)
            for name, share in (("p50", 0.5), ("p99", 0.99))}


def request_body(model: str, i: int, max_tokens: int) -> dict:
    """The i-th streamed chat request, asking for the usage in its last chunk."""
    return {"model": model, "messages": question(i), "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}


async def raw_chunks(client, model: str, i: int, max_tokens: int) -> AsyncIterator[tuple[bool, int | None]]:
    """(whether the chunk carries text, its usage's completion tokens or None) of each chunk, parsed from the SSE
    lines with json alone."""
    async with client.stream("POST", "/v1/chat/completions", json=request_body(model, i, max_tokens)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error chunk: {chunk['error']}")
            delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
            yield bool(delta.get("content") or delta.get("reasoning_content")), (chunk.get("usage") or {}).get(
                "completion_tokens")


async def openai_chunks(client, model: str, i: int, max_tokens: int) -> AsyncIterator[tuple[bool, int | None]]:
    """The same through the OpenAI SDK's streaming objects."""
    body = request_body(model, i, max_tokens)
    async for chunk in await client.chat.completions.create(**body):
        delta = chunk.choices[0].delta if chunk.choices else None
        yield bool(delta and (delta.content or getattr(delta, "reasoning_content", None))), (
            chunk.usage.completion_tokens if chunk.usage else None)


async def one_request(chunks: AsyncIterator[tuple[bool, int | None]]) -> dict:
    start, started = time.time(), time.perf_counter()
    first, tokens = None, 0
    async for has_text, usage in chunks:
        tokens = usage if usage is not None else tokens
        if first is None and has_text:
            first = time.perf_counter() - started
    return {"ttft": first if first is not None else time.perf_counter() - started, "tokens": tokens,
            "s": time.perf_counter() - started, "start": start}


async def load(url: str, api_key: str, clients: int, requests: range, max_tokens: int, timeout: float,
               kind: str = "raw") -> tuple[list[dict], list[str], float, float]:
    """(results, errors, start, end) of `clients` streaming clients working through `requests`."""
    import openai  # its httpx client serves the raw reads too (the SDK's own httpx fork, where it has one)

    # trust_env=False: a proxy from the environment (HTTP_PROXY) must never sit between a load test and its server
    http = openai.DefaultAsyncHttpxClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"},
                                          timeout=timeout, trust_env=False)
    if kind == "openai":
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=timeout,
                                    http_client=http)
        chunks = openai_chunks
    else:
        client, chunks = http, raw_chunks
    model = (await http.get("/v1/models")).json()["data"][0]["id"]
    queue = list(requests)
    results, errors = [], []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            try:
                results.append(await one_request(chunks(client, model, i, max_tokens)))
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{type(e).__name__}: {e}")

    started = time.time()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return results, errors, started, time.time()


def _load_in_process(args: tuple) -> tuple[list[dict], list[str], float, float]:
    import gc

    gc.collect()
    gc.freeze()  # as the server does: a full collection of the imports' objects would stall these clients' reads
    return asyncio.run(load(*args))


def run(url: str, api_key: str, clients: int, requests: int, max_tokens: int, timeout: float,
        procs: int = 1, client: str = "raw") -> dict:
    """The load's figures; with procs > 1 the clients are split over that many processes, so that the
    clients' own Python (parsing every chunk) is not what limits tokens/s."""
    shares = [(url, api_key, len(range(p, clients, procs)), range(p, requests, procs), max_tokens, timeout, client)
              for p in range(procs)]
    if procs == 1:
        parts = [_load_in_process(shares[0])]
    else:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            parts = pool.map(_load_in_process, shares)
    results = [r for part in parts for r in part[0]]
    errors = [e for part in parts for e in part[1]]
    wall = max(part[3] for part in parts) - min(part[2] for part in parts)
    return {"clients": clients, "client": client, "client_processes": procs, "requests": requests,
            "max_tokens": max_tokens,
            "errors": len(errors), "first_errors": errors[:3], **figures(results, wall, clients)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="serve this model ('default', .gguf, HF folder; 'tiny': a random 2-layer one)")
    parser.add_argument("--url", help="or load a running server")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-tokens", type=int, default=65_536)
    parser.add_argument("--procs", type=int, default=1, help="client processes the clients are split over")
    parser.add_argument("--client", choices=["raw", "openai"], default="raw",
                        help="read the stream with httpx and json, or through the OpenAI SDK")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request before it counts as an error")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--server-log", help="write the local server's output here (its engine logs tokens/s and "
                        "step times every 10 s)")
    args = parser.parse_args()
    if bool(args.model) == bool(args.url):
        parser.error("give --model or --url")
    model = tiny_model() if args.model == "tiny" else args.model
    url, proc = (args.url, None) if args.url else start_local(model, args.device, args.kv_cache_tokens,
                                                                            args.server_log)
    try:
        before = ttft_buckets(url, args.api_key)
        result = run(url, args.api_key, args.clients, args.requests, args.max_tokens, args.timeout, args.procs,
                     args.client)
        result.update(server_ttft(before, ttft_buckets(url, args.api_key)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    emit(result, args.out)


if __name__ == "__main__":
    main()
