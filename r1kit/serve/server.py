"""`r1kit serve`: load the model, start its engine (a process of its own on a GPU, a thread on the CPU), run the
app under uvicorn."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1kit.config import ServeConfig
from r1kit.serve.app import ServedModel, create_app
from r1kit.serve.escalation import Upstream
from r1kit.serve.process import EngineProcess
from r1kit.serve.router import Gate, Router
from r1kit.serve.worker import EngineWorker, freeze_heap, warm_engine


def free_port() -> int:
    """A port nothing listens on right now, on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app, port: int, log_level: str = "warning"):
    """Run app under uvicorn on 127.0.0.1:port in a daemon thread; (server, thread) once it listens.

    Stop it with `server.should_exit = True`, then join the thread.
    """
    import uvicorn

    from r1kit.serve.guard import MAX_HEADER_BYTES, OpenAIH11Protocol

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level,
                                           http=OpenAIH11Protocol, h11_max_incomplete_event_size=MAX_HEADER_BYTES))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread


def load_served(spec: str, name: str | None, device: str, kv_cache_tokens: int, prefill_chunk_tokens: int,
                engine_process: bool | None = None) -> ServedModel:
    """A model ready to serve: engine running and warm (bf16 on GPU), tokenizer loaded, sha256 computed.

    The engine runs in a process of its own on a GPU (`engine_process` None), on a thread of this one on
    the CPU, where a step is slow enough that sharing the interpreter lock costs little."""
    from r1kit.models import load_tokenizer, pick_device, resolve_model, weights_sha256

    folder = resolve_model(spec)
    log = logging.getLogger("r1kit.serve")
    started = time.perf_counter()
    # the pinned sha256 reads every byte of the weights (~30 s for a 14B model): while the engine starts
    hashing = ThreadPoolExecutor(1, thread_name_prefix="r1kit-sha256")
    sha256 = hashing.submit(weights_sha256, folder)
    hashing.shutdown(wait=False)  # the hash runs on; the pool takes nothing more
    if engine_process if engine_process is not None else pick_device(device).type == "cuda":
        worker = EngineProcess(str(folder), device, kv_cache_tokens, prefill_chunk_tokens)
        tokenizer = load_tokenizer(str(folder))
    else:
        engine = warm_engine(str(folder), device, kv_cache_tokens, prefill_chunk_tokens)
        worker, tokenizer = EngineWorker(engine), engine.tokenizer
    log.info("engine loaded and warmed up in %.1f s", time.perf_counter() - started)
    served_name = name or (Path(spec).name if spec != "default" else "SmolLM2-135M-Instruct")
    return ServedModel(name=served_name, worker=worker, tokenizer=tokenizer, sha256=sha256.result(),
                       path=str(folder), created=int(time.time()))


def build_app(cfg: ServeConfig):
    """The app for a config: one model, or several with the router and gate the config names."""
    upstream = Upstream(cfg.upstream) if cfg.upstream else None  # a missing key fails before minutes of loading
    entries = [(m.model, m.name) for m in cfg.models] or [(cfg.model, cfg.name)]
    served = [load_served(spec, name, cfg.device, cfg.kv_cache_tokens, cfg.prefill_chunk_tokens)
              for spec, name in entries]
    app = create_app(served, cfg, api_key=cfg.api_key or os.environ.get("R1KIT_API_KEY"),
                     router=Router(cfg.route) if cfg.route else None, gate=Gate(cfg.gate) if cfg.gate else None,
                     upstream=upstream)
    return app, served


def run_serve(cfg: ServeConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    from r1kit.serve.guard import MAX_HEADER_BYTES, OpenAIH11Protocol

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")  # the engine's stats lines
    app, served = build_app(cfg)
    freeze_heap()
    for m in served:
        print(f"serving {m.name} (sha256 {m.sha256[:12]})")
    print(f"at http://{cfg.host}:{cfg.port}/ (chat page) and http://{cfg.host}:{cfg.port}/v1 (OpenAI API)")
    # h11 with OpenAI-shaped 400s for what it cannot parse (an oversized header, say)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", http=OpenAIH11Protocol,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
