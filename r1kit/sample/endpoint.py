"""The endpoint teacher: an OpenAI-compatible chat endpoint (hosted R1, vLLM, Ollama, `r1kit serve`) writes traces."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

from r1kit.rollout.types import Completion, RoundByRound, SamplingParams

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0
BODY_CHARS = 300  # of an error body in a message: enough to read the server's reason


class TeacherError(RuntimeError):
    """An endpoint that keeps failing or refuses a request; the message names URL, status and body."""


def sample_seed(seed: int | None, key: int, j: int) -> int:
    """The seed of sample j of row `key`: the same on every rerun; 31 bits, which every endpoint accepts."""
    digest = hashlib.sha256(f"{seed}:{key}:{j}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def trace_text(message: dict) -> str:
    """A chat message as r1kit's trace: separate reasoning goes inside <think> tags, before the answer."""
    reasoning = (message.get("reasoning_content") or message.get("reasoning") or "").strip()
    content = message.get("content") or ""
    return f"<think>\n{reasoning}\n</think>\n\n{content.strip()}" if reasoning else content


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):  # absent, or an HTTP date: back off as usual
        return None


class EndpointTeacher(RoundByRound):
    """An OpenAI-compatible chat endpoint as teacher: bounded concurrency, retries with backoff, a request timeout."""

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 600.0, max_retries: int = 8, backoff_s: float = 1.0,
                 system_prompt: str | None = None):
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout_s > 0")
        self.url, self.model, self.system_prompt = url, model, system_prompt
        base = url.rstrip("/")
        base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.endpoint = base + "/v1/chat/completions"
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        key = api_key if api_key is not None else os.environ.get("R1KIT_TEACHER_API_KEY")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self.retries = 0
        self._lock = threading.Lock()

    def identity(self) -> dict[str, str]:
        """Who wrote the traces, for provenance rows."""
        return {"teacher_url": self.url, "teacher_model": self.model}

    def generate(self, questions: list[str], params: SamplingParams, keys: list[int],
                 progress: Callable[[int], None] | None = None) -> list[Completion]:
        """params.n completions per question, grouped by question in order (group-major)."""
        if len(keys) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(keys)} keys")
        jobs = [(i, j) for i in range(len(questions)) for j in range(params.n)]
        out: list[Completion | None] = [None] * len(jobs)
        stop = threading.Event()  # once one sample fails for good, the others stop retrying
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher")
        try:
            futures = {pool.submit(self._sample, questions[i], i, params, sample_seed(params.seed, keys[i], j), stop): k
                       for k, (i, j) in enumerate(jobs)}
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                if progress is not None:
                    progress(1)
        except BaseException:
            stop.set()
            raise
        finally:
            # after a failure, requests in flight finish on their own: waiting could take a whole timeout
            pool.shutdown(wait=not stop.is_set(), cancel_futures=True)
        return out  # type: ignore[return-value]

    def _sample(self, question: str, index: int, params: SamplingParams, seed: int, stop: threading.Event
                ) -> Completion:
        messages = [{"role": "user", "content": question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        # n=1 per request: many hosted endpoints (DeepSeek's among them) refuse n > 1
        body = {"model": self.model, "messages": messages, "n": 1, "temperature": params.temperature,
                "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": seed}
        if params.stop:
            body["stop"] = list(params.stop)
        reply = self._post(json.dumps(body).encode(), stop)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("message"), dict):
            raise TeacherError(f"{self.endpoint}: malformed response, no choices: {json.dumps(reply)[:BODY_CHARS]}")
        choice = choices[0]
        return Completion(text=trace_text(choice["message"]), token_ids=[], logprobs=[],
                          finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                          prompt_index=index)

    def _post(self, data: bytes, stop: threading.Event) -> dict:
        last = ""
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise TeacherError(f"{self.endpoint}: abandoned after another request failed")
            request = urllib.request.Request(self.endpoint, data=data, headers=self.headers, method="POST")
            wait = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise TeacherError(f"{self.endpoint}: response is not JSON: {raw[:BODY_CHARS]!r}") from None
            except urllib.error.HTTPError as e:
                try:
                    text = e.read().decode("utf-8", "replace")[:BODY_CHARS]
                except (OSError, http.client.HTTPException):
                    text = ""
                last = f"{e.code} {e.reason}: {text}"
                if e.code not in RETRY_STATUSES:
                    raise TeacherError(f"{self.endpoint}: {last}") from None
                wait = _retry_after(e.headers)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out (URLError is an OSError)
                last = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            if attempt == self.max_retries:
                break
            with self._lock:
                self.retries += 1
            if wait is None:
                wait = min(MAX_BACKOFF_S, self.backoff_s * 2**attempt * random.uniform(0.5, 1.5))
            stop.wait(wait)  # wakes at once when another sample has failed for good
        raise TeacherError(f"{self.endpoint}: {self.max_retries + 1} attempts failed; last error: {last}")
