"""`r1kit chat`: a terminal chat over the OpenAI API, streaming, with the reasoning dimmed."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

from rich.console import Console

from r1kit.config import ChatConfig, ServeConfig


class ChatClient:
    """Streams chat completions from a server with only the standard library."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url, self.api_key = url.rstrip("/"), api_key

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        try:
            return urllib.request.urlopen(urllib.request.Request(self.url + path, data=data, headers=headers))
        except urllib.error.HTTPError as e:
            raise ValueError(f"{self.url}{path}: {json.load(e).get('error', {}).get('message', e)}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"cannot reach {self.url}: {e.reason}") from None

    def first_model(self) -> str:
        with self._request("/v1/models") as r:
            return json.load(r)["data"][0]["id"]

    def stream(self, model: str, messages: list[dict], temperature: float, max_tokens: int
               ) -> Iterator[tuple[str, str]]:
        """(reasoning delta, content delta) pairs as the reply streams in."""
        body = {"model": model, "messages": messages, "stream": True, "temperature": temperature,
                "max_tokens": max_tokens}
        with self._request("/v1/chat/completions", body) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    delta = choice.get("delta", {})
                    yield delta.get("reasoning_content") or "", delta.get("content") or ""


def local_server(cfg: ChatConfig) -> str:
    """Serve cfg.model on a free loopback port in this process; its URL."""
    from r1kit.serve.server import build_app, free_port, serve_in_thread

    port = free_port()
    app, _ = build_app(ServeConfig(model=cfg.model, name=cfg.name, device=cfg.device, port=port))
    serve_in_thread(app, port)
    return f"http://127.0.0.1:{port}"


def run_chat(cfg: ChatConfig) -> None:
    """Read a line, stream the reply (reasoning dim, answer plain), repeat; /reset forgets, /exit or Ctrl-D ends."""
    if bool(cfg.model) == bool(cfg.url):
        raise ValueError("give either --model (chat in-process) or --url (a running server)")
    console = Console(highlight=False)
    url = cfg.url or local_server(cfg)
    client = ChatClient(url, cfg.api_key or os.environ.get("R1KIT_API_KEY"))
    model = cfg.name or client.first_model()
    console.print(f"[bold]{model}[/bold] at {url} · /reset forgets the conversation, /exit or Ctrl-D ends")
    messages: list[dict] = []
    while True:
        try:
            line = console.input("[bold cyan]you> [/bold cyan]").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages.clear()
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        answer, thinking = "", False
        for reasoning, content in client.stream(model, messages, cfg.temperature, cfg.max_tokens):
            if reasoning:
                if not thinking:
                    console.print("[dim]thinking: [/dim]", end="")
                    thinking = True
                console.print(reasoning, style="dim", end="")
            if content:
                if thinking and not answer:
                    console.print()
                answer += content
                console.print(content, end="")
        console.print()
        messages.append({"role": "assistant", "content": answer})
