"""The gate judges its samples off the event loop: a slow judgement stalls no other request."""

import asyncio
import threading
import time

import openai

from r1kit.config import GateConfig, ServeConfig, ServedModelConfig
from r1kit.serve.router import Gate
from r1kit.serve.server import build_app, free_port, serve_in_thread

CONTENT = "The answer is 4."  # what the scripted model answers after its reasoning

SLOW_VERIFIER = '''
import time
from pathlib import Path


def check(text):
    """Says it has started, then takes its time, as sympy can over many samples."""
    Path(__file__).with_name("judging").touch()
    time.sleep(1.5)
    return "4" in text
'''


def test_the_gates_process_decides_as_decide_does():
    gate = Gate(GateConfig(model="m", samples=4, min_agreement=0.75))
    try:
        for contents in (["\\boxed{4}", "It is 4", "\\boxed{5}", "no idea"],
                         ["\\boxed{1/2}", "so 0.5", "\\boxed{\\frac{1}{2}}", "3"]):
            assert asyncio.run(gate.judge(contents)) == gate.decide(contents)
    finally:
        gate.close()


def test_a_slow_gate_judgement_leaves_other_requests_answered_promptly(scripted_dir, tmp_path):
    verifier = tmp_path / "slow_check.py"
    verifier.write_text(SLOW_VERIFIER)
    cfg = ServeConfig(port=free_port(), device="cpu", kv_cache_tokens=8192,
                      models=[ServedModelConfig(name="reasoner", model=str(scripted_dir))],
                      gate=GateConfig(model="reasoner", samples=4, verifier=f"{verifier}:check"))
    app, served = build_app(cfg)
    server, thread = serve_in_thread(app, cfg.port, log_level="error")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.port}/v1", api_key="none", max_retries=0)

    def chat(model: str):
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is 2 + 2?"}],
                                              max_tokens=32)

    gated: dict = {}
    asking = threading.Thread(target=lambda: gated.update(response=chat("gate")))
    try:
        asking.start()
        deadline = time.time() + 120  # the judging process starts at the first gated request
        while not (tmp_path / "judging").exists():
            assert asking.is_alive() and time.time() < deadline, gated
            time.sleep(0.02)
        started = time.perf_counter()
        assert "gate" in {m.id for m in client.models.list().data}
        assert chat("reasoner").choices[0].message.content == CONTENT
        elapsed = time.perf_counter() - started
        assert asking.is_alive(), "answered only after the gate's judgement (4 samples x 1.5 s)"
        assert elapsed < 2.0
        asking.join(timeout=60)
        gate = gated["response"].model_extra["gate"]
        assert gated["response"].choices[0].message.content == CONTENT
        assert gate == {"confident": True, "agreement": 1.0, "answer": None, "samples": 4, "model": "reasoner"}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        for m in served:
            m.worker.close()
