"""The server with the official openai client on 127.0.0.1, on a scripted and a random tiny model."""

import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from conftest import SCRIPT, micro_llama

from r1kit.config import ServeConfig, load_config
from r1kit.models import model_info
from r1kit.serve.app import create_app
from r1kit.serve.server import free_port, load_served, serve_in_thread

REASONING, CONTENT = "Two plus two makes four", "The answer is 4."
KEY = "sk-test-123"


class Server:
    """uvicorn on a thread, for one test module."""

    def __init__(self, model_dir, api_key: str | None = KEY, log_level: str = "error", **limits):
        self.cfg = ServeConfig(model=str(model_dir), port=free_port(), device="cpu",
                               **{"kv_cache_tokens": 8192, **limits})
        self.served = load_served(self.cfg.model, "tiny", "cpu", self.cfg.kv_cache_tokens,
                                  self.cfg.prefill_chunk_tokens)
        self.app = create_app([self.served], self.cfg, api_key=api_key)
        self.server, self.thread = serve_in_thread(self.app, self.cfg.port, log_level=log_level)
        self.url = f"http://127.0.0.1:{self.cfg.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "none", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.served.worker.close()


@pytest.fixture(scope="module")
def scripted(scripted_dir):
    server = Server(scripted_dir, max_tokens=64, max_prompt_tokens=200, max_body_bytes=20_000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rambler(tiny_model_dir):
    server = Server(tiny_model_dir, max_concurrent=1, max_tokens=8000)
    yield server
    server.stop()


def ask(server, **kw):
    return server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **kw)


def test_chat_separates_reasoning(scripted):
    response = ask(scripted, max_tokens=32)
    message = response.choices[0].message
    assert message.content == CONTENT, response
    assert message.reasoning_content == REASONING and message.reasoning == REASONING
    assert response.choices[0].finish_reason == "stop" and response.model == "tiny"


def test_streaming_sends_reasoning_then_content(scripted):
    reasoning, content, order = "", "", []
    for chunk in ask(scripted, max_tokens=32, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
            continue
        delta = chunk.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            reasoning += delta.reasoning_content
            order.append("r")
        if delta.content:
            content += delta.content
            order.append("c")
    assert (reasoning, content) == (REASONING, CONTENT)
    assert order == sorted(order, key=lambda x: x == "c")  # all reasoning before any content
    assert usage.completion_tokens == len(scripted.served.tokenizer.encode(SCRIPT, add_special_tokens=False)) + 1
    assert usage.completion_tokens_details.reasoning_tokens == 5  # Two, plus, two, makes, four


def test_n_choices_usage_and_stop(scripted):
    response = ask(scripted, max_tokens=32, n=3, temperature=1.0, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.message.content == CONTENT for c in response.choices)
    prompt = scripted.served.chat_prompt([{"role": "user", "content": "hi"}])[0]
    per_choice = len(scripted.served.tokenizer.encode(SCRIPT, add_special_tokens=False)) + 1
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 3 * per_choice
    assert response.usage.total_tokens == len(prompt) + 3 * per_choice
    stopped = ask(scripted, max_tokens=32, stop=[" is"])
    assert stopped.choices[0].message.content == "The answer" and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(scripted, max_tokens=32, stop=" is", stream=True)
                       if c.choices)
    assert streamed == "The answer"
    short = ask(scripted, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.choices[0].message.reasoning_content == "Two plus"


def test_completions_endpoint(scripted):
    # seeded: off its script the model can still fall into it and stop early, as some unseeded draws do
    response = scripted.client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=5, n=2, seed=0)
    assert len(response.choices) == 4 and all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 20


def test_models_lists_the_weight_sha256(scripted, scripted_dir):
    models = scripted.client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].sha256 == model_info(str(scripted_dir))["sha256"]
    with urllib.request.urlopen(scripted.url + "/health") as r:
        assert json.load(r) == {"status": "ok"}
    with urllib.request.urlopen(scripted.url + "/") as r:
        assert "<title>r1kit chat</title>" in r.read().decode()


def test_bad_key_and_limits_are_refused(scripted):
    bad = openai.OpenAI(base_url=scripted.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="max_tokens is 100; this server allows at most 64"):
        ask(scripted, max_tokens=100)
    with pytest.raises(openai.BadRequestError, match="this server allows at most 200") as e:
        scripted.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 500}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as e:
        scripted.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "y" * 30_000}])
    assert e.value.status_code == 413
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        scripted.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n: Input should be less than or equal to 64"):
        ask(scripted, n=65)


def test_concurrency_limit_and_disconnect(rambler):
    first = ask(rambler, max_tokens=3000, stream=True)
    chunks = iter(first)
    next(chunks), next(chunks)  # generating now
    with rambler.served.worker.lock:
        (seq,) = rambler.served.worker.engine.scheduler.running
    with pytest.raises(openai.RateLimitError):
        ask(rambler, max_tokens=5)
    first.close()  # the client goes away: its generation stops and frees the slot
    worker, engine = rambler.served.worker, rambler.served.worker.engine

    def idle() -> bool:
        with worker.lock:  # between steps, not inside one
            return not engine.has_work() and len(engine.blocks.free) == len(engine.blocks.refs)

    deadline = time.time() + 5  # far less than the 3000 tokens would take
    while not idle() and time.time() < deadline:
        time.sleep(0.02)
    assert idle() and seq.finish_reason == "abort" and len(seq.output_ids) < 3000
    assert ask(rambler, max_tokens=5).choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError, match="max_tokens 5000 exceed tiny.s context of 4096 tokens") as e:
        ask(rambler, max_tokens=5000)
    assert e.value.code == "context_length_exceeded"


def test_router_and_gate(scripted_dir, tiny_model_dir):
    from r1kit.config import GateConfig, RouteConfig, ServedModelConfig
    from r1kit.serve.server import build_app

    cfg = ServeConfig(port=free_port(), device="cpu", kv_cache_tokens=8192,
                      models=[ServedModelConfig(name="reasoner", model=str(scripted_dir)),
                              ServedModelConfig(name="fast", model=str(tiny_model_dir))],
                      route=RouteConfig(reasoner="reasoner", fast="fast", keywords=["solve"]),
                      gate=GateConfig(model="reasoner", samples=4))
    app, served = build_app(cfg)
    server, thread = serve_in_thread(app, cfg.port, log_level="error")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1", api_key="none", max_retries=0)
    try:
        chat = lambda model, text: client.chat.completions.create(  # noqa: E731
            model=model, messages=[{"role": "user", "content": text}], max_tokens=16)
        assert chat("auto", "Please solve 2 + 2").model == "reasoner"
        assert chat("auto", "hello there").model == "fast"
        gated = chat("gate", "What is 2 + 2?")
        assert gated.choices[0].message.content == CONTENT
        assert gated.gate == {"confident": True, "agreement": 1.0, "answer": "4", "samples": 4, "model": "reasoner"}
        assert {m.id for m in client.models.list().data} == {"reasoner", "fast", "auto", "gate"}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for m in served:
            m.worker.close()


def test_gate_refuses_without_consensus_and_rules_route():
    from r1kit.config import GateConfig, RouteConfig
    from r1kit.serve.router import Gate, Router

    gate = Gate(GateConfig(model="m", samples=4, min_agreement=0.75))
    verdict = gate.decide(["\\boxed{4}", "It is 4", "\\boxed{5}", "no idea"])
    assert not verdict.confident and verdict.agreement == 0.5 and verdict.answer == "4"
    assert gate.refusal(verdict) == ("I am not confident enough to answer: only 50% of my 4 attempts agree "
                                     "(at least 75% needed).")
    assert gate.decide(["\\boxed{1/2}", "so 0.5", "\\boxed{\\frac{1}{2}}", "3"]).confident
    by_length = Router(RouteConfig(reasoner="r", fast="f", rule="length", min_chars=10))
    assert (by_length.pick("short"), by_length.pick("a much longer question")) == ("f", "r")


def test_terminal_chat_streams_reasoning_and_answer(scripted_dir, scripted):
    import subprocess
    import sys

    lines = "What is 2 + 2?\n/reset\nAgain?\n/exit\n"
    local = subprocess.run([sys.executable, "-m", "r1kit.cli", "chat", "--model", str(scripted_dir), "--device", "cpu"],
                           input=lines, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    assert local.stdout.count(f"thinking: {REASONING}\n{CONTENT}") == 2
    remote = subprocess.run([sys.executable, "-m", "r1kit.cli", "chat", "--url", scripted.url, "--api-key", KEY,
                             "--max-tokens", "32"],
                            input="hi\n", capture_output=True, text=True, timeout=60)
    assert f"thinking: {REASONING}\n{CONTENT}" in remote.stdout
    wrong = subprocess.run([sys.executable, "-m", "r1kit.cli", "chat", "--url", scripted.url, "--api-key", "bad"],
                           input="hi\n", capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "Incorrect API key provided" in wrong.stderr


def test_step_stats_summarize_a_window():
    from r1kit.serve.worker import StepStats

    stats = StepStats(every_s=0.0)
    stats.record("decode", 0.002, 64)
    stats.record("prefill", 0.010, 1)
    stats.record("decode", 0.004, 60)
    line = stats.line(running=60, waiting=3)
    assert "2 decode steps 3.0 ms mean (4 max), 1 prefill steps 10.0 ms mean (10 max)" in line
    assert line.endswith("running 60, waiting 3")
    assert stats.line(running=60, waiting=3) is None  # a new window, with no step in it yet


def test_worker_inbox_refusals_and_aborts_happen_on_the_engine_thread():
    import asyncio
    from types import SimpleNamespace

    from r1kit.rollout.engine.scheduler import Request
    from r1kit.rollout.types import SamplingParams
    from r1kit.serve.worker import EngineWorker

    class StubEngine:
        scheduler = SimpleNamespace(running=[], waiting=[])
        decoder = SimpleNamespace(max_len=4096)

        def __init__(self):
            self.added, self.aborted, self.threads = [], [], set()

        def add_request(self, ids, params):
            self.threads.add(threading.current_thread().name)
            if params.n > 1:
                raise ValueError("needs more KV blocks than the cache has")
            self.added.append(ids)
            return Request(len(self.added) - 1, [], False)

        def abort(self, request):
            self.aborted.append(request.id)

        def has_work(self):
            return False

    engine = StubEngine()
    worker = EngineWorker(engine)

    async def first_event(params):
        async for item in worker.stream([[1, 2]], params):
            return item

    with pytest.raises(ValueError, match="needs more KV blocks"):
        asyncio.run(first_event(SamplingParams(n=2)))
    with worker.lock:  # the engine thread is between steps: both reach its inbox before it looks
        early = worker.submit([3], SamplingParams(), lambda events: None)
        worker.abort(early)
    late = worker.submit([4], SamplingParams(), lambda events: None)
    deadline = time.time() + 5
    while late.request is None and time.time() < deadline:
        time.sleep(0.01)
    worker.abort(late)
    while not engine.aborted and time.time() < deadline:
        time.sleep(0.01)
    worker.close()
    assert early.request is None and engine.added == [[4]] and engine.aborted == [0]
    assert engine.threads == {"r1kit-engine"}


def test_a_stream_sends_what_arrives_within_its_interval_as_one_chunk(monkeypatch):
    import asyncio

    from r1kit.rollout.types import SamplingParams
    from r1kit.serve.worker import Event, Submission, Worker

    def step(*tokens: int, finish: str | None = None) -> list[Event]:
        return [Event(0, token, finish if token == tokens[-1] else None, "") for token in tokens]

    class Scripted(Worker):  # an engine whose steps come while the stream waits out its interval
        def submit(self, prompt_ids, params, listener):
            listener(step(1))
            self.listener = listener
            return Submission(prompt_ids, params, listener)

    worker, steps, slept = Scripted(), [[step(2), step(3), step(4)], [step(5, finish="stop")]], []

    async def sleep(seconds):
        slept.append(seconds)
        for events in steps.pop(0):
            worker.listener(events)

    async def chunks():
        return [[e.token for e in events] async for _, events in worker.stream([[9]], SamplingParams(), 0.01)]

    monkeypatch.setattr(asyncio, "sleep", sleep)
    assert asyncio.run(chunks()) == [[1], [2, 3, 4], [5]]
    assert slept == [0.01, 0.01]  # none after the last


def test_a_failing_step_ends_its_requests_and_the_worker_goes_on(tokenizer):
    import asyncio

    from r1kit.rollout.engine import LLMEngine
    from r1kit.rollout.types import SamplingParams
    from r1kit.serve.worker import EngineWorker

    engine = LLMEngine(micro_llama(), tokenizer, kv_cache_tokens=256, max_num_seqs=4)
    worker = EngineWorker(engine)

    async def run(prompt):
        return [events async for _, events in worker.stream([prompt], SamplingParams(max_tokens=3, ignore_eos=True))]

    with pytest.raises(IndexError):  # token 1000 is outside this model's 64-token embedding: prefill raises
        asyncio.run(run([5, 1000]))
    steps = asyncio.run(run([5, 6, 7]))
    worker.close()
    assert [e.finish_reason for events in steps for e in events] == [None, None, "length"]
    assert not engine.has_work() and len(engine.blocks.free) == len(engine.blocks.refs)


def test_generation_failures_reach_the_client_in_openais_shape(tmp_path, tokenizer):
    micro_llama().save_pretrained(tmp_path)  # 64 embeddings: every chat prompt's token ids overflow them
    tokenizer.save_pretrained(tmp_path)
    broken = Server(tmp_path, api_key=None)
    try:
        with pytest.raises(openai.InternalServerError, match="generation failed: IndexError") as e:
            ask(broken, max_tokens=4)
        assert e.value.code == "generation_failed"
        with pytest.raises(openai.APIError, match="generation failed: IndexError"):  # after the stream has begun
            list(ask(broken, max_tokens=4, stream=True))
        assert broken.client.models.list().data[0].id == "tiny"  # the server and its engine thread live on
    finally:
        broken.stop()


def test_the_engine_in_its_own_process(tiny_model_dir):
    # as `r1kit serve` runs it on a GPU: the engine in a child process, requests and events through pipes
    import asyncio

    from r1kit.rollout.types import SamplingParams
    from r1kit.serve.process import EngineProcess

    cfg = ServeConfig(model=str(tiny_model_dir), port=free_port(), device="cpu", kv_cache_tokens=2048)
    served = load_served(cfg.model, "tiny", "cpu", cfg.kv_cache_tokens, cfg.prefill_chunk_tokens, engine_process=True)
    assert isinstance(served.worker, EngineProcess) and served.worker.max_len == 2048
    server, thread = serve_in_thread(create_app([served], cfg), cfg.port, log_level="error")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1", api_key="none", max_retries=0)
    try:
        chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}])
        streamed = list(client.chat.completions.create(**chat, max_tokens=6, stream=True, seed=3,
                                                       stream_options={"include_usage": True}))
        assert streamed[-1].usage.completion_tokens <= 6
        whole = client.chat.completions.create(**chat, max_tokens=6, n=2, seed=3)
        assert len(whole.choices) == 2 and whole.choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError, match="exceed tiny.s context of 2048 tokens"):
            client.chat.completions.create(**chat, max_tokens=2040)

        async def first_then_leave():  # a client that goes away: its request is aborted in the child
            async for _ in served.worker.stream([[5, 6, 7]], SamplingParams(max_tokens=1500, ignore_eos=True)):
                return

        asyncio.run(first_then_leave())
        assert not served.worker._listeners
        with pytest.raises(ValueError, match="exceed the engine's context of 2048 tokens"):
            asyncio.run(_stream_all(served.worker, [1] * 2000))
        served.worker.process.kill()  # the engine dies (a crash, the OOM killer): the server says so
        served.worker.process.join(timeout=10)
        with pytest.raises(urllib.error.HTTPError) as down:
            urllib.request.urlopen(f"http://127.0.0.1:{cfg.port}/health")
        assert down.value.code == 503 and json.load(down.value) == {"status": "engine down", "models": ["tiny"]}
        with pytest.raises(openai.InternalServerError, match="the engine process has exited"):
            client.chat.completions.create(**chat, max_tokens=4)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        served.worker.close()


async def _stream_all(worker, prompt):
    from r1kit.rollout.types import SamplingParams

    return [events async for _, events in worker.stream([prompt], SamplingParams(max_tokens=100))]


def test_an_engine_process_that_cannot_load_says_why(tmp_path):
    from r1kit.serve.process import EngineError, EngineProcess

    with pytest.raises(EngineError, match=f"the engine process could not load {tmp_path}: "):
        EngineProcess(str(tmp_path), "cpu", 1024, 2048)


def test_prefill_chunk_tokens_reaches_the_serving_engine(tiny_model_dir):
    cfg = load_config(ServeConfig, None, {"model": str(tiny_model_dir), "device": "cpu", "kv_cache_tokens": 1024,
                                          "prefill_chunk_tokens": 64})
    served = load_served(cfg.model, "tiny", "cpu", cfg.kv_cache_tokens, cfg.prefill_chunk_tokens)
    try:
        assert served.worker.engine.scheduler.max_prefill_tokens == 64
    finally:
        served.worker.close()
    assert ServeConfig().prefill_chunk_tokens == 2048


def test_max_sequences_per_request_from_yaml_flag_and_override(tmp_path):
    import argparse

    from r1kit.config import ConfigError, GateConfig, add_config_arguments, config_from_args, load_config

    path = tmp_path / "serve.yaml"
    path.write_text("max_sequences_per_request: 4\n")
    assert load_config(ServeConfig, path).max_sequences_per_request == 4
    assert load_config(ServeConfig, path, {"max_sequences_per_request": 2}).max_sequences_per_request == 2
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ServeConfig)
    args = parser.parse_args(["--config", str(path), "--max-sequences-per-request", "8"])
    assert config_from_args(ServeConfig, args).max_sequences_per_request == 8
    assert config_from_args(ServeConfig, parser.parse_args(["max_sequences_per_request=3"])).max_sequences_per_request \
        == 3
    assert ServeConfig().max_sequences_per_request == 16
    with pytest.raises(ConfigError, match="max_sequences_per_request: Input should be greater than or equal to 1"):
        load_config(ServeConfig, None, {"max_sequences_per_request": 0})
    # the gate's samples are one request's sequences: a gate that could never be asked is refused up front
    with pytest.raises(ValueError, match="gate.samples 5 is over max_sequences_per_request 4"):
        ServeConfig(max_sequences_per_request=4, gate=GateConfig(model="m", samples=5))
