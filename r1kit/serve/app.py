"""`create_app()`: the OpenAI-compatible API over the engine, with the reasoning trace apart from the answer."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError

from r1kit.config import ServeConfig
from r1kit.prompts import THINK_OPEN
from r1kit.rollout.types import SamplingParams, encode_prompts
from r1kit.serve.admission import ClientGone, Load, Slot, SlotStream, held, read_body, unless_gone
from r1kit.serve.escalation import Upstream, UpstreamAnswer, provenance
from r1kit.serve.guard import Guard, install_error_handlers
from r1kit.serve.metrics import CONTENT_TYPE, Metrics
from r1kit.serve.reasoning import ReasoningSplitter, split_reasoning
from r1kit.serve.responses import (
    ChoiceText,
    chat_stream,
    collect,
    completion_stream,
    count_tokens,
    ending_errors,
    whole_reply,
)
from r1kit.serve.router import Gate, Router, Verdict, check_names
from r1kit.serve.schemas import APIError, ChatRequest, CompletionRequest, SamplingFields, describe, usage
from r1kit.serve.templating import chat_ids
from r1kit.serve.worker import Worker


@dataclass
class ServedModel:
    """A model the server answers as `name`: its engine worker, tokenizer and weight identity."""

    name: str
    worker: Worker
    tokenizer: Any
    sha256: str
    path: str
    created: int

    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], bool]:
        """Prompt ids of a conversation (its content read as text, never as special tokens), and whether the
        template already opened a <think> block."""
        try:
            ids, text = chat_ids(self.tokenizer, messages)
        except Exception as error:  # noqa: BLE001 - a template's raise_exception (roles out of order, say)
            raise APIError(400, f"the chat template refused these messages: {error}", param="messages") from None
        return ids, text.rstrip().endswith(THINK_OPEN)


def sampling(req: SamplingFields, cfg: ServeConfig, max_tokens: int | None) -> SamplingParams:
    """SamplingParams of a request, with OpenAI's defaults and this server's limits."""
    wanted = max_tokens or cfg.default_max_tokens
    if wanted > cfg.max_tokens:
        raise APIError(400, f"max_tokens is {wanted}; this server allows at most {cfg.max_tokens}", param="max_tokens")
    stop = tuple(s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or ()) if s)  # "": none
    return SamplingParams(n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=req.top_p or 1.0, top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
                          repetition_penalty=req.repetition_penalty or 1.0, max_tokens=wanted, stop=stop,
                          seed=req.seed)


def create_app(models: list[ServedModel], cfg: ServeConfig, api_key: str | None = None,
               router: Router | None = None, gate: Gate | None = None, upstream: Upstream | None = None) -> FastAPI:
    """The FastAPI app serving `models` under `cfg`'s limits; `api_key` turns on bearer-token auth.

    With a router the name `auto` picks a model per request (the response's `model` says which); with a
    gate the name `gate` answers only when its samples agree. An upstream answers the gate's questions whose
    samples disagree, and those a route names it for; the response's `r1kit` field says who answered.
    """
    app = FastAPI(title="r1kit", docs_url=None, redoc_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=cfg.max_body_bytes)
    install_error_handlers(app)
    by_name = {m.name: m for m in models}
    check_names(set(by_name), router, gate, upstream.name if upstream else None)
    load = app.state.load = Load(cfg)  # on app.state for tests
    metrics = app.state.metrics = Metrics({m.name: m.worker for m in models})
    if gate is not None:
        app.router.on_shutdown.append(gate.close)  # its judging process

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody is left to read it

    async def parse(request: Request, schema):
        """The request, validated before anything else sees it: malformed JSON (bad UTF-8, lone surrogates,
        nesting past pydantic's limit), wrong types and settings this server cannot honour are all 400s."""
        body = await read_body(request, cfg.max_body_bytes)
        try:
            req = schema.model_validate_json(body or b"null")
        except ValidationError as e:
            param, message = describe(e.errors())
            raise APIError(400, message, param=param) from None
        refused = req.unsupported()
        if refused is not None:
            raise APIError(400, refused[1], code="unsupported_parameter", param=refused[0])
        return req

    def model_for(name: str) -> ServedModel:
        if name not in by_name:
            raise APIError(404, f"The model `{name[:100]}` does not exist; this server has {', '.join(by_name)}",
                           code="model_not_found", param="model")
        return by_name[name]

    def check_prompt(ids: list[int]) -> None:
        if not ids:  # the engine cannot prefill nothing
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server allows at most "
                           f"{cfg.max_prompt_tokens}", code="context_length_exceeded")

    def check_context(served: ServedModel, ids: list[int], params: SamplingParams) -> None:
        context = served.worker.max_len
        if len(ids) + params.max_tokens > context:
            raise APIError(400, f"the prompt's {len(ids)} tokens + max_tokens {params.max_tokens} exceed "
                           f"{served.name}'s context of {context} tokens", code="context_length_exceeded")

    def generate(slot: Slot, served: ServedModel, prompts: list[list[int]], params: SamplingParams) -> AsyncIterator:
        """A request's events, counted for /metrics, its slot held until they end."""
        events = served.worker.stream(prompts, params, cfg.stream_interval_ms / 1000)
        return _counted(slot, metrics.observed(served.name, sum(map(len, prompts)), params.n * len(prompts), events))

    async def escalated(request: Request, req: ChatRequest, messages: list[dict[str, str]], reason: str
                        ) -> UpstreamAnswer | None:
        """The upstream's answer, or None if it failed; counted either way."""
        answer = await unless_gone(request, upstream.answer(messages, req))
        metrics.escalations.labels(reason, "failed" if answer is None else "answered").inc()
        return answer

    @app.get("/health")
    async def health() -> JSONResponse:
        down = [m.name for m in models if not m.worker.alive()]
        if down:  # 503: a load balancer or supervisor should stop sending here, or restart the server
            return JSONResponse({"status": "engine down", "models": down}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        # no local path: it tells a client about the host (user names, mounts); the sha256 identifies the weights
        data = [{"id": m.name, "object": "model", "created": m.created, "owned_by": "r1kit", "sha256": m.sha256}
                for m in models]
        if router is not None:
            data.append({"id": "auto", "object": "model", "created": models[0].created, "owned_by": "r1kit",
                         "routes_to": [router.cfg.reasoner, router.cfg.fast]})
        if gate is not None:
            data.append({"id": "gate", "object": "model", "created": models[0].created, "owned_by": "r1kit",
                         "answers_with": gate.cfg.model, "samples": gate.cfg.samples})
        return {"object": "list", "data": data}

    @app.get("/metrics")
    def prometheus() -> Response:  # a plain def: FastAPI runs it on a thread, off the event loop
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return (files("r1kit.serve") / "static" / "index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        if gate is not None and req.model == "gate":
            return await gated(request, req, messages)
        name, note = req.model, None
        if router is not None and name == "auto":
            name = router.pick(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
            note = provenance("local", True, False)
            if upstream is not None and name == upstream.name:
                answer = await escalated(request, req, messages, "route")
                if answer is not None:
                    return whole_reply(answer.model, answer.reasoning, answer.content, answer.finish_reason,
                                       answer.usage, {"r1kit": provenance("upstream", True, True)}, req.stream)
                name, note = router.other(name), provenance("local", False, True)
        served = model_for(name)
        prompt, in_reasoning = served.chat_prompt(messages)
        check_prompt(prompt)
        params = sampling(req, cfg, req.max_completion_tokens or req.max_tokens)
        check_context(served, prompt, params)
        slot = load.admit(params.n)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name,
                **({"r1kit": note} if note else {})}
        choices = [ChoiceText(served.tokenizer, params.stop) for _ in range(params.n)]
        events = generate(slot, served, [prompt], params)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            splitters = [ReasoningSplitter(in_reasoning) for _ in range(params.n)]
            return SlotStream(ending_errors(chat_stream(meta, choices, splitters, events, len(prompt),
                                                        include_usage, served.tokenizer)), slot)
        await held(slot, unless_gone(request, collect(events, choices, params.n)))
        out, reasoning_tokens = [], 0
        for i, choice in enumerate(choices):
            reasoning, content = split_reasoning(choice.sent, in_reasoning)
            reasoning_tokens += count_tokens(served.tokenizer, reasoning)
            out.append({"index": i, "finish_reason": choice.finish_reason, "logprobs": None,
                        "message": {"role": "assistant", "content": content, "reasoning_content": reasoning or None,
                                    "reasoning": reasoning or None}})
        completion_tokens = sum(c.tokens for c in choices)
        return {**meta, "object": "chat.completion", "choices": out,
                "usage": usage(len(prompt), completion_tokens, reasoning_tokens)}

    async def gated(request: Request, req: ChatRequest, messages: list[dict[str, str]]):
        served = model_for(gate.cfg.model)
        prompt, in_reasoning = served.chat_prompt(messages)
        check_prompt(prompt)
        params = replace(sampling(req, cfg, req.max_completion_tokens or req.max_tokens), n=gate.cfg.samples,
                         temperature=gate.cfg.temperature)
        check_context(served, prompt, params)
        slot = load.admit(params.n)
        choices = [ChoiceText(served.tokenizer, params.stop) for _ in range(params.n)]
        events = generate(slot, served, [prompt], params)
        splits: list[tuple[str, str]] = []

        async def sampled_and_judged() -> Verdict:  # the slot is held while judging too: the samples are in memory
            await collect(events, choices, params.n)
            splits.extend(split_reasoning(c.sent, in_reasoning) for c in choices)
            return await _judged(gate, [content for _, content in splits])

        verdict = await held(slot, unless_gone(request, sampled_and_judged()))
        metrics.gate.labels(served.name, str(verdict.confident).lower()).inc()
        model, finish = "gate", "stop"
        if verdict.confident:
            (reasoning, content), note = splits[verdict.chosen], provenance("local", True, False)
        elif upstream is None:
            reasoning, content, note = "", gate.refusal(verdict), provenance("local", False, False)
        elif (answer := await escalated(request, req, messages, "disagreement")) is not None:
            model, reasoning, content, finish = answer.model, answer.reasoning, answer.content, answer.finish_reason
            note = provenance("upstream", True, True)
        else:  # the upstream is down: the best local answer (the largest agreeing share's, or the first sample)
            (reasoning, content), note = splits[verdict.chosen or 0], provenance("local", False, True)
        judged = {"confident": verdict.confident, "agreement": verdict.agreement, "answer": verdict.answer,
                  "samples": params.n, "model": served.name}  # the local samples' verdict, whoever answered
        return whole_reply(model, reasoning, content, finish, usage(len(prompt), sum(c.tokens for c in choices)),
                           {"gate": judged, "r1kit": note}, req.stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        served = model_for(req.model)
        params = sampling(req, cfg, req.max_tokens or 16)
        slot = load.admit(params.n * len(req.prompts()))  # before tokenizing: 400 / 429 cost the server nothing
        try:
            prompts = prompt_ids(served, req.prompts())
            for ids in prompts:
                check_prompt(ids)
                check_context(served, ids, params)
        except BaseException:
            slot.release()
            raise
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
        choices = [ChoiceText(served.tokenizer, params.stop) for _ in range(params.n * len(prompts))]
        events = generate(slot, served, prompts, params)
        prompt_tokens = sum(map(len, prompts))
        if req.stream:
            return SlotStream(ending_errors(completion_stream(meta, choices, events, params.n)), slot)
        await held(slot, unless_gone(request, collect(events, choices, params.n)))
        out = [{"index": i, "text": c.sent, "finish_reason": c.finish_reason, "logprobs": None}
               for i, c in enumerate(choices)]
        return {**meta, "object": "text_completion", "choices": out,
                "usage": usage(prompt_tokens, sum(c.tokens for c in choices))}

    return app


def prompt_ids(served: ServedModel, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    """Token ids of completion prompts given as text, or as ids checked against the vocabulary."""
    if prompts and isinstance(prompts[0], str):
        return encode_prompts(served.tokenizer, prompts)
    vocab = len(served.tokenizer)
    for i, ids in enumerate(prompts):
        if max(ids) >= vocab:  # the engine would index past its embedding: a failed step
            raise APIError(400, f"prompt {i} has token id {max(ids)}; {served.name}'s vocabulary has {vocab}",
                           param="prompt")
    return prompts


async def _judged(gate: Gate, contents: list[str]) -> Verdict:
    """The gate's verdict on a request's samples, judged off the event loop; a failure (the user's verifier
    raising, say) is a 500 in OpenAI's shape."""
    try:
        return await gate.judge(contents)
    except Exception as error:
        raise APIError(500, f"the gate could not judge the samples: {type(error).__name__}: {error}",
                       "server_error", "gate_failed") from error


async def _counted(slot: Slot, events: AsyncIterator) -> AsyncIterator:
    """The events, the request's slot held until they end or the client leaves; an engine that refuses the
    request (ValueError) or fails raises APIError (400 or 500)."""
    try:
        async for item in events:
            yield item
    except ValueError as error:
        raise APIError(400, f"the engine refused the request: {error}") from error
    except Exception as error:
        raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error",
                       "generation_failed") from error
    finally:
        slot.release()
        await events.aclose()






