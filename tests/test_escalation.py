"""Escalation to an upstream `r1kit serve` on 127.0.0.1: counted, marked in the response, and a local answer,
marked not confident, once the upstream is killed."""

import json
from dataclasses import replace

import openai
import pytest
from test_serve_metrics import scrape, value

from r1kit.config import GateConfig, RouteConfig, ServeConfig, ServedModelConfig, UpstreamConfig
from r1kit.serve.app import create_app
from r1kit.serve.escalation import Upstream
from r1kit.serve.router import Router
from r1kit.serve.schemas import ChatRequest
from r1kit.serve.server import build_app, free_port, serve_in_thread

REASONING, CONTENT = "Two plus two makes four", "The answer is 4."  # the scripted model's, wherever it runs
UPSTREAM_KEY = "sk-upstream"
REJECT_ALL = "def check(text):\n    return False\n"  # the gate's samples never pass: every gated question escalates


@pytest.fixture(scope="module")
def servers(scripted_dir, tmp_path_factory):
    """The local server (gate, route to the upstream) and the upstream, another r1kit server with its own key."""
    verifier = tmp_path_factory.mktemp("verifier") / "reject_all.py"
    verifier.write_text(REJECT_ALL)
    upstream_port = free_port()
    cfg = ServeConfig(port=free_port(), device="cpu", kv_cache_tokens=8192,
                      models=[ServedModelConfig(name="reasoner", model=str(scripted_dir))],
                      route=RouteConfig(reasoner="upstream", fast="reasoner", keywords=["prove"]),
                      gate=GateConfig(model="reasoner", samples=3, verifier=f"{verifier}:check"),
                      upstream=UpstreamConfig(url=f"http://127.0.0.1:{upstream_port}/v1", model="frontier",
                                              api_key_env="R1KIT_TEST_UPSTREAM_KEY", max_retries=0, timeout_s=60))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("R1KIT_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
        app, served = build_app(cfg)
    # the upstream shares the local engine (the worker takes requests from any thread): one model load, not two
    upstream_cfg = ServeConfig(port=upstream_port, device="cpu")
    frontier = [replace(served[0], name="frontier")]
    upstream = serve_in_thread(create_app(frontier, upstream_cfg, api_key=UPSTREAM_KEY), upstream_port, "error")
    local = serve_in_thread(app, cfg.port, log_level="error")
    yield f"http://127.0.0.1:{cfg.port}", upstream
    for server, thread in (local, upstream):
        server.should_exit = True
        thread.join(timeout=10)
    served[0].worker.close()


def ask(url: str, model: str, text: str, **kw):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=32,
                                          **kw)


def escalations(url: str, reason: str, outcome: str) -> float:
    return value(scrape(url), "r1kit:escalations_total", reason=reason, outcome=outcome)


def test_escalation_answers_counts_and_falls_back(servers):
    url, (upstream, upstream_thread) = servers
    gated = ask(url, "gate", "What is 2 + 2?")
    assert gated.model == "frontier"  # who answered
    assert gated.model_extra["r1kit"] == {"answered_by": "upstream", "confident": True, "escalated": True}
    assert gated.model_extra["gate"]["confident"] is False  # the local samples' verdict
    message = gated.choices[0].message
    assert (message.content, message.reasoning_content) == (CONTENT, REASONING)
    routed = ask(url, "auto", "Please prove that 2 + 2 = 4")
    assert routed.model == "frontier" and routed.model_extra["r1kit"]["answered_by"] == "upstream"
    local = ask(url, "auto", "hello there")
    assert local.model == "reasoner"
    assert local.model_extra["r1kit"] == {"answered_by": "local", "confident": True, "escalated": False}
    streamed = list(ask(url, "gate", "What is 2 + 2?", stream=True))
    assert len(streamed) == 1 and streamed[0].model == "frontier"
    assert streamed[0].choices[0].delta.content == CONTENT
    metrics = scrape(url)
    assert value(metrics, "r1kit:escalations_total", reason="disagreement", outcome="answered") == 2
    assert value(metrics, "r1kit:escalations_total", reason="route", outcome="answered") == 1
    assert value(metrics, "r1kit:gate_verdicts_total", model_name="reasoner", confident="false") == 2

    upstream.should_exit = True  # killed: connections refused from now on
    upstream_thread.join(timeout=10)
    fallback = ask(url, "gate", "What is 2 + 2?")
    assert fallback.model == "gate" and fallback.choices[0].message.content == CONTENT  # the local answer
    assert fallback.model_extra["r1kit"] == {"answered_by": "local", "confident": False, "escalated": True}
    routed = ask(url, "auto", "Please prove that 2 + 2 = 4", stream=True)
    chunks = [chunk for chunk in routed if chunk.choices]
    assert {chunk.model for chunk in chunks} == {"reasoner"}  # the route's local model, streamed as usual
    assert chunks[0].model_extra["r1kit"] == {"answered_by": "local", "confident": False, "escalated": True}
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == CONTENT
    assert escalations(url, "disagreement", "failed") == 1 and escalations(url, "route", "failed") == 1


def test_config_mistakes_fail_before_serving(monkeypatch):
    monkeypatch.delenv("R1KIT_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="R1KIT_TEST_NO_SUCH_KEY, which is not set"):
        Upstream(UpstreamConfig(url="http://127.0.0.1:9/v1", model="m", api_key_env="R1KIT_TEST_NO_SUCH_KEY"))
    with pytest.raises(ValueError, match="as both reasoner and fast"):
        create_app([], ServeConfig(), router=_router("upstream", "upstream"),
                   upstream=Upstream(UpstreamConfig(url="http://127.0.0.1:9/v1", model="m")))
    with pytest.raises(ValueError, match="'upstream', which is not served"):
        create_app([], ServeConfig(), router=_router("upstream", "upstream"))
    assert "api_key" not in UpstreamConfig.model_fields  # only the variable's name can be configured


def _router(reasoner: str, fast: str) -> Router:
    return Router(RouteConfig(reasoner=reasoner, fast=fast))


def test_the_upstream_gets_the_clients_settings(monkeypatch):
    sent = {}

    def post(self, data, stop):
        sent.update(json.loads(data))
        return {"model": "m", "choices": [{"message": {"content": "<think>hm</think>4"}, "finish_reason": "stop"}]}

    monkeypatch.setattr(Upstream, "_post", post)
    req = ChatRequest.model_validate({"model": "gate", "messages": [{"role": "user", "content": "hi"}], "n": 5,
                                      "temperature": 0.3, "max_completion_tokens": 99, "stop": ["x"]})
    answer = Upstream(UpstreamConfig(url="http://127.0.0.1:9", model="m")).chat([{"role": "user", "content": "hi"}],
                                                                              req)
    assert (answer.reasoning, answer.content) == ("hm", "4")  # a <think> block left in the text is split off
    assert sent == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1, "temperature": 0.3,
                    "max_tokens": 99, "stop": ["x"]}
