"""The endpoint teacher against stub endpoints on 127.0.0.1 (faults, refusals, timeouts) and a real `r1kit serve`."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from r1kit.rollout.types import SamplingParams
from r1kit.sample.endpoint import EndpointTeacher, TeacherError, sample_seed
from r1kit.serve.server import free_port


class Stub:
    """A chat-completions endpoint on a thread; `answer(body, attempt)` gives (status, headers, payload)."""

    def __init__(self, answer):
        self.answer, self.lock = answer, threading.Lock()
        self.attempts: Counter = Counter()  # (question, seed) -> requests seen
        self.successes: Counter = Counter()
        self.order: list = []  # distinct (question, seed) in the order first seen
        self.bodies: list[dict] = []
        self.auth: set = set()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = (body["messages"][-1]["content"], body.get("seed"))
                with stub.lock:
                    attempt = stub.attempts[key]
                    stub.attempts[key] += 1
                    if attempt == 0:
                        stub.order.append(key)
                    stub.bodies.append(body)
                    stub.auth.add(self.headers.get("Authorization"))
                    distinct = stub.order.index(key)
                if self.path != "/v1/chat/completions":
                    status, headers, payload = 404, {}, {"error": {"message": f"no route {self.path}"}}
                else:
                    status, headers, payload = stub.answer(body, attempt, distinct)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {**headers, "Content-Type": "application/json"}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and went away
                    return
                if status == 200:
                    with stub.lock:
                        stub.successes[key] += 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stub_of():
    stubs = []

    def make(answer) -> Stub:
        stubs.append(Stub(answer))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


def chat(message: dict, finish_reason: str = "stop") -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish_reason}]}


def echo(body: dict, attempt: int, distinct: int):
    """Reasoning and answer from the question and seed; the first attempt of every third request fails."""
    question, seed = body["messages"][-1]["content"], body["seed"]
    if attempt == 0 and distinct % 3 == 0:
        return (429, {"Retry-After": "0"}, {"error": "slow down"}) if distinct % 2 else (500, {}, {"error": "oops"})
    if question == "inline":  # a model that writes its own tags and no separate reasoning
        return 200, {}, chat({"content": "<think>mine</think>42"})
    name = "reasoning" if question.endswith("1") else "reasoning_content"  # vLLM's newer name, and the older
    return 200, {}, chat({name: f"  thinking {question} {seed}\n", "content": f"answer {question} "},
                         "length" if question == "q2" else "stop")


def test_samples_in_order_with_retries(stub_of):
    stub = stub_of(echo)
    questions = [f"q{i}" for i in range(7)] + ["inline"]
    keys = [100 + i for i in range(len(questions))]
    params = SamplingParams(n=3, temperature=0.6, top_p=0.95, max_tokens=77, seed=5)
    teacher = EndpointTeacher(stub.url + "/v1/", "r1", api_key="sk-x", concurrency=4, backoff_s=0.01,
                              system_prompt="Think first.")
    done = []
    out = teacher.generate(questions, params, keys, progress=done.append)
    assert len(out) == len(questions) * 3 and sum(done) == len(out)
    for k, c in enumerate(out):
        i, j = divmod(k, 3)
        q, seed = questions[i], sample_seed(5, keys[i], j)
        assert c.prompt_index == i and c.token_ids == [] and c.logprobs == []
        if q == "inline":
            assert c.text == "<think>mine</think>42"
        else:
            assert c.text == f"<think>\nthinking {q} {seed}\n</think>\n\nanswer {q}"
        assert c.finish_reason == ("length" if q == "q2" else "stop")
    assert len({sample_seed(5, key, j) for key in keys for j in range(3)}) == len(out)
    failed = sum(1 for d in range(len(out)) if d % 3 == 0)
    assert teacher.retries == failed > 0
    assert len(stub.successes) == len(out) and set(stub.successes.values()) == {1}
    body = stub.bodies[0]
    assert body["messages"][0] == {"role": "system", "content": "Think first."} and body["n"] == 1
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.6, 0.95, 77)
    assert stub.auth == {"Bearer sk-x"}
    assert teacher.identity() == {"teacher_url": stub.url + "/v1/", "teacher_model": "r1"}
    # a rerun asks the same things, and the plain base URL reaches the same route
    again = EndpointTeacher(stub.url, "r1", api_key="sk-x", backoff_s=0.01, system_prompt="Think first.")
    assert [c.text for c in again.generate(questions, params, keys)] == [c.text for c in out]
    assert set(stub.successes.values()) == {2}


def test_refusals_and_exhausted_retries(stub_of, monkeypatch):
    refusing = stub_of(lambda body, attempt, distinct: (401, {}, {"error": {"message": "bad key"}}))
    monkeypatch.setenv("R1KIT_TEACHER_API_KEY", "from-env")
    teacher = EndpointTeacher(refusing.url, "r1", backoff_s=0.01)
    with pytest.raises(TeacherError, match=r"/v1/chat/completions: 401 Unauthorized: .*bad key"):
        teacher.generate(["q"], SamplingParams(), [0])
    assert sum(refusing.attempts.values()) == 1 and teacher.retries == 0 and refusing.auth == {"Bearer from-env"}

    down = stub_of(lambda body, attempt, distinct: (503, {}, {"error": "down"}))
    teacher = EndpointTeacher(down.url, "r1", max_retries=2, backoff_s=0.01)
    with pytest.raises(TeacherError, match="3 attempts failed; last error: 503"):
        teacher.generate(["q"], SamplingParams(), [0])
    assert sum(down.attempts.values()) == 3 and teacher.retries == 2

    empty = stub_of(lambda body, attempt, distinct: (200, {}, {"choices": []}))
    with pytest.raises(TeacherError, match="malformed response"):
        EndpointTeacher(empty.url, "r1").generate(["q"], SamplingParams(), [0])

    nobody = EndpointTeacher(f"http://127.0.0.1:{free_port()}", "r1", max_retries=1, backoff_s=0.01)
    with pytest.raises(TeacherError, match="2 attempts failed; last error: URLError"):
        nobody.generate(["q"], SamplingParams(), [0])
    assert nobody.retries == 1


def test_timeout_is_retried(stub_of):
    def slow_first(body, attempt, distinct):
        if attempt == 0:
            time.sleep(1.0)
        return 200, {}, chat({"reasoning_content": "r", "content": "c"})

    stub = stub_of(slow_first)
    teacher = EndpointTeacher(stub.url, "r1", timeout_s=0.3, backoff_s=0.01)
    start = time.monotonic()
    assert [c.text for c in teacher.generate(["q"], SamplingParams(), [0])] == ["<think>\nr\n</think>\n\nc"]
    assert teacher.retries == 1 and time.monotonic() - start < 1.0


def test_against_r1kit_serve(scripted_dir):
    from test_serve import KEY, Server

    server = Server(scripted_dir, max_tokens=64)
    try:
        teacher = EndpointTeacher(server.url + "/v1", "tiny", api_key=KEY, concurrency=4)
        params = SamplingParams(n=2, temperature=0.6, max_tokens=32, seed=1)
        out = teacher.generate(["What is 2+2?", "hi", "2 + 2?"], params, [7, 8, 9])
        assert [c.text for c in out] == ["<think>\nTwo plus two makes four\n</think>\n\nThe answer is 4."] * 6
        assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2] and {c.finish_reason for c in out} == {"stop"}
        assert teacher.identity() == {"teacher_url": server.url + "/v1", "teacher_model": "tiny"}
        with pytest.raises(TeacherError, match="401"):
            EndpointTeacher(server.url, "tiny", api_key="wrong").generate(["hi"], params, [0])
    finally:
        server.stop()
