"""GET /metrics: Prometheus text that its own parser reads, the counters moving as requests are served."""

import asyncio
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from r1kit.config import ServeConfig
from r1kit.rollout.types import SamplingParams
from r1kit.serve.app import create_app
from r1kit.serve.metrics import Metrics
from r1kit.serve.server import free_port, load_served, serve_in_thread

KEY = "sk-metrics"
Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    """Every sample of /metrics (asked without the key, as a Prometheus scraper does), by name and labels."""
    with urllib.request.urlopen(url + "/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def served(scripted_dir):
    cfg = ServeConfig(model=str(scripted_dir), port=free_port(), device="cpu", kv_cache_tokens=8192, max_tokens=64)
    model = load_served(cfg.model, "tiny", "cpu", cfg.kv_cache_tokens, cfg.prefill_chunk_tokens)
    server, thread = serve_in_thread(create_app([model], cfg, api_key=KEY), cfg.port, log_level="error")
    yield model, f"http://127.0.0.1:{cfg.port}"
    server.should_exit = True
    thread.join(timeout=10)
    model.worker.close()


def test_counters_move_by_what_was_served(served):
    model, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=32)
    before = scrape(url)
    whole = client.chat.completions.create(**chat, n=2)
    streamed = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    completion = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=5, seed=0)
    after = scrape(url)
    usages = [whole.usage, streamed[-1].usage, completion.usage]
    tiny = {"model_name": "tiny"}
    assert moved(before, after, "r1kit:prompt_tokens_total", **tiny) == sum(u.prompt_tokens for u in usages)
    assert moved(before, after, "r1kit:generation_tokens_total", **tiny) == sum(u.completion_tokens for u in usages)
    assert moved(before, after, "r1kit:time_to_first_token_seconds_count", **tiny) == 3  # one per request
    assert moved(before, after, "r1kit:e2e_request_latency_seconds_count", **tiny) == 3
    assert moved(before, after, "r1kit:inter_token_latency_seconds_count", **tiny) > 0
    # sequences by how they ended: the chats stop on their script, the completions run out of tokens
    assert moved(before, after, "r1kit:request_success_total", finished_reason="stop", **tiny) == 3
    assert moved(before, after, "r1kit:request_success_total", finished_reason="length", **tiny) == 2
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(after, f"r1kit:{gauge}", **tiny) == 0, gauge  # nothing left in the engine


def test_gauges_show_what_the_engine_holds(served):
    model, url = served

    async def look_then_leave() -> Samples:
        events = model.worker.stream([[5, 6, 7]], SamplingParams(max_tokens=2000, ignore_eos=True))
        async for _ in events:
            break
        during = scrape(url)  # the request runs on while we look
        await events.aclose()  # leaving aborts it
        while model.worker.load().running:  # the engine drops it; until then its events come to this loop
            await asyncio.sleep(0.02)
        return during

    during = asyncio.run(asyncio.wait_for(look_then_leave(), 30))
    assert value(during, "r1kit:num_requests_running") == 1
    # its blocks reserved in full: 2003 tokens, 126 of the 512 blocks of 16
    assert value(during, "r1kit:kv_cache_usage_perc") == pytest.approx(126 / 512)
    assert value(scrape(url), "r1kit:kv_cache_usage_perc") == 0


def test_an_engine_process_reports_its_load(scripted_dir):
    worker = load_served(str(scripted_dir), "tiny", "cpu", 2048, 2048, engine_process=True).worker

    async def first_then_wait() -> int:
        async for _ in worker.stream([[5, 6, 7]], SamplingParams(max_tokens=1500, ignore_eos=True)):
            deadline = time.time() + 10  # the child reports every 0.5 s
            while not worker.load().running and time.time() < deadline:
                await asyncio.sleep(0.05)
            return worker.load().running

    try:
        assert asyncio.run(first_then_wait()) == 1
        deadline = time.time() + 10
        while worker.load().running and time.time() < deadline:
            time.sleep(0.05)
        assert worker.load().running == 0 and worker.load().kv_usage == 0
    finally:
        worker.close()


def test_apps_in_one_process_keep_their_own_registries():
    first, second = Metrics({}), Metrics({})  # the global registry would refuse the second's names
    first.prompt_tokens.labels("m").inc(5)
    assert b'r1kit:prompt_tokens_total{model_name="m"} 5.0' in first.exposition()
    assert b"model_name=" not in second.exposition()
