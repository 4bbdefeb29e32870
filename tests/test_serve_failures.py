"""A decode step that fails for one request's sequence ends that request alone: the engine steps the batch again in
halves until the failing sequence steps alone, the others keep this step's token and finish as they would alone."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest
from conftest import micro_llama
from test_serve import Server

from r1kit.rollout.engine import LLMEngine
from r1kit.rollout.types import SamplingParams
from r1kit.serve.worker import EngineWorker

BAD_SEED = 13  # the marked request: every decode step with its sequence in it raises once it has 2 tokens


def bad(seqs) -> bool:
    return any(seq.params.seed == BAD_SEED and len(seq.output_ids) >= 2 for seq in seqs)


def fail_launch(engine: LLMEngine, monkeypatch) -> None:
    """A decode step (the forward and the sampler) that raises as a whole when a marked sequence is in it."""
    launch = engine._launch

    def launched(seqs):
        if bad(seqs):
            raise RuntimeError("injected decode failure")
        return launch(seqs)

    monkeypatch.setattr(engine, "_launch", launched)


def fail_record(engine: LLMEngine, monkeypatch) -> None:
    """Recording a marked sequence's token (its stop check, which decodes its text) raises."""
    check = engine._check_finished

    def checked(seq):
        if bad([seq]):
            raise RuntimeError("injected decode failure")
        check(seq)

    monkeypatch.setattr(engine, "_check_finished", checked)


@pytest.fixture()
def worker(tokenizer):

    engine = LLMEngine(micro_llama(), tokenizer, kv_cache_tokens=512, max_num_seqs=8)
    w = EngineWorker(engine)
    yield w
    w.close()


def run(worker: EngineWorker, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Submit the requests together (one prefill) and gather what each listener got until all have ended."""
    got: dict[str, list] = {name: [] for name in requests}
    with worker.lock:
        for name, (ids, params) in requests.items():
            worker.submit(ids, params, got[name].append)

    def ended(name: str) -> bool:
        items, n = got[name], requests[name][1].n
        return any(isinstance(x, Exception) for x in items) or \
            sum(e.finish_reason is not None for x in items if not isinstance(x, Exception) for e in x) == n

    deadline = time.time() + 30
    while not all(map(ended, requests)) and time.time() < deadline:
        time.sleep(0.01)
    return got


def by_sequence(items: list) -> dict[int, list[tuple]]:
    """Each sequence's events, as (token, finish reason, text)."""
    out: dict[int, list[tuple]] = {}
    for event in (e for x in items for e in x):
        out.setdefault(event.index, []).append((event.token, event.finish_reason, event.text))
    return out


def clean(worker: EngineWorker) -> bool:
    """Nothing left in flight: no request, no sequence, every KV block free."""
    engine = worker.engine
    with worker.lock:
        return (not engine.has_work() and not worker.listeners and not worker.fresh
                and len(engine.blocks.free) == len(engine.blocks.refs) and set(engine.blocks.refs) == {0})


@pytest.mark.parametrize("failing", [fail_launch, fail_record])
def test_a_failing_decode_step_ends_only_its_request(worker, failing, monkeypatch, caplog):
    good = {"a": ([5, 6, 7], SamplingParams(n=2, max_tokens=8, ignore_eos=True, seed=1)),
            "b": ([9, 3], SamplingParams(max_tokens=6, ignore_eos=True, seed=2, top_k=5)),
            "c": ([4] * 20, SamplingParams(max_tokens=8, ignore_eos=True, seed=3))}
    alone = {name: by_sequence(run(worker, {name: request})[name]) for name, request in good.items()}
    failing(worker.engine, monkeypatch)
    caplog.set_level("WARNING", logger="r1kit.serve")
    got = run(worker, {**good, "bad": ([8, 8], SamplingParams(n=2, max_tokens=8, ignore_eos=True, seed=BAD_SEED))})
    for name in good:
        assert by_sequence(got[name]) == alone[name], name  # every token, as alone, and finished
    errors = [x for x in got["bad"] if isinstance(x, Exception)]
    assert [str(e) for e in errors] == ["injected decode failure"] and got["bad"][-1] is errors[0]
    assert all(len(events) <= 2 for events in by_sequence(got["bad"][:-1]).values())  # its tokens before it failed
    assert "engine decode step failed" in caplog.text and "fails its decode step" in caplog.text
    assert clean(worker)


def test_a_decode_step_that_fails_once_ends_nobody(worker, monkeypatch):
    request = {"a": ([5, 6, 7], SamplingParams(n=3, max_tokens=6, ignore_eos=True, seed=1))}
    alone = by_sequence(run(worker, request)["a"])
    launch, failures = worker.engine._launch, [RuntimeError("transient")]

    def launched(seqs):
        if len(seqs[0].output_ids) == 3 and failures:
            raise failures.pop()
        return launch(seqs)

    monkeypatch.setattr(worker.engine, "_launch", launched)
    assert by_sequence(run(worker, request)["a"]) == alone and not failures
    assert clean(worker)


def post(port: int, body: dict) -> tuple[int, str]:
    """One request to the server; (status, body text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, text


def stream_text(text: str) -> tuple[str, list[dict]]:
    """A completion stream's text, and its error chunks."""
    datas = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]", text
    chunks = [json.loads(d) for d in datas[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if "choices" in c), [c for c in chunks if "error" in c]


def openai_error(body: dict) -> dict:
    """The error of a body in OpenAI's shape (a server error that names the failure)."""
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == "server_error" and error["code"] == "generation_failed", body
    assert "injected decode failure" in error["message"], body
    return error


def test_the_server_ends_only_the_failing_request(tiny_model_dir, monkeypatch):
    server = Server(tiny_model_dir, api_key=None, log_level="critical", max_tokens=64)
    try:
        worker = server.served.worker
        good = {"stream": {"prompt": "Once upon a time", "max_tokens": 24, "seed": 1, "stream": True},
                "whole": {"prompt": "The cat", "max_tokens": 24, "seed": 2, "n": 2}}
        bad = {"bad stream": {"prompt": "Hello", "max_tokens": 24, "seed": BAD_SEED, "stream": True},
               "bad whole": {"prompt": "Hi there", "max_tokens": 24, "seed": BAD_SEED, "n": 2}}
        requests = {name: {"model": "tiny", "temperature": 1.0, **body} for name, body in {**good, **bad}.items()}
        alone = {name: post(server.cfg.port, requests[name]) for name in good}
        fail_launch(worker.engine, monkeypatch)
        answers: dict[str, tuple[int, str]] = {}
        with worker.lock:  # all four reach the engine's inbox before it steps: one prefill, one batch
            threads = [threading.Thread(target=lambda n=name: answers.update({n: post(server.cfg.port, requests[n])}))
                       for name in requests]
            for thread in threads:
                thread.start()
            deadline = time.time() + 30
            while worker.inbox.qsize() < len(requests) and time.time() < deadline:
                time.sleep(0.01)
        for thread in threads:
            thread.join(timeout=60)
        status, text = answers["stream"]
        assert status == 200 and stream_text(text) == (stream_text(alone["stream"][1])[0], [])
        status, text = answers["whole"]
        assert status == 200 and json.loads(text)["choices"] == json.loads(alone["whole"][1])["choices"]
        status, text = answers["bad stream"]
        _, errors = stream_text(text)
        assert status == 200 and len(errors) == 1 and openai_error(errors[0])  # the stream had begun
        status, text = answers["bad whole"]
        assert status == 500 and openai_error(json.loads(text))
        deadline = time.time() + 10
        while not (clean(worker) and server.app.state.load.requests == 0) and time.time() < deadline:
            time.sleep(0.02)
        assert clean(worker) and server.app.state.load.requests == 0
    finally:
        server.stop()


def test_a_mailbox_runs_posts_from_other_threads_in_order_with_one_wakeup_a_batch():
    # a step's events for many streams wake the server's loop once, not once a stream, and keep their order
    import asyncio

    from r1kit.serve.worker import mailbox

    loop = asyncio.new_event_loop()
    wakeups, seen = [], []
    schedule = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda fn, *args: (wakeups.append(fn), schedule(fn, *args))
    box = mailbox(loop)
    assert mailbox(loop) is box
    poster = threading.Thread(target=lambda: [box.post(seen.append, i) for i in range(100)])
    poster.start()
    poster.join()  # the loop is not running: every post after the first joins the drain already scheduled
    loop.run_until_complete(asyncio.sleep(0))
    assert seen == list(range(100)) and len(wakeups) == 1
    box.post(seen.append, 100)  # drained: the next post schedules a drain of its own
    loop.run_until_complete(asyncio.sleep(0))
    assert seen == list(range(101)) and len(wakeups) == 2
    loop.close()
