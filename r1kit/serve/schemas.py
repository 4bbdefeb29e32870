"""The OpenAI request and response shapes r1kit serves (chat, completions, models, errors).

Requests are validated strictly (no string-to-number coercion, no NaN or Infinity, bounded integers) so that
nothing a client sends can reach the engine in a form that fails a step shared with other clients.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")  # unknown OpenAI fields (user, metadata) pass
MAX_SEED = 2**32  # the sampler's keys are 32-bit: larger seeds would be cut silently, so they are refused
INT32 = 2**31 - 1

TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32)]], Field(min_length=1)]


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are read (the check is `ChatRequest.unsupported`)."""

    model_config = STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A message as clients send it; content may be text or a list of text parts."""

    model_config = STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content)
        return self.content or ""


class SamplingFields(BaseModel):
    """Settings both endpoints accept (top_k, min_p and repetition_penalty as vLLM extends OpenAI's)."""

    model_config = STRICT
    model: str = Field(max_length=256)
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT32)  # -1: off, as in vLLM
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    stop: str | Annotated[list[Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = \
        Field(None, max_length=512)
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # asked for by clients, not served: declared so a request that uses them is refused, not silently answered
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) of the first setting this server cannot honour, else None."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server; use repetition_penalty"
        return None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        for i, message in enumerate(self.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                if part.type != "text":
                    return (f"messages.{i}.content.{j}", f"{part.type!r} content parts are not supported: "
                            "this model reads text only")
                if part.text is None:
                    return f"messages.{i}.content.{j}.text", "a text part needs its text"
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported by this server"
        if self.tools or self.functions:
            return "tools", "tool calling is not supported by this server"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                return name, f"{name} is not supported by this server"
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format", "only the 'text' response_format is supported by this server"
        if self.audio is not None or any(m != "text" for m in self.modalities or ()):
            return "modalities", "this server answers in text only"
        return super().unsupported()


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=64)

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported by this server"
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        if self.best_of not in (None, self.n):
            return "best_of", "best_of is not supported by this server; ask for n completions instead"
        return super().unsupported()

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts as a list: texts, or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt


class APIError(Exception):
    """An error the client gets in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, code, param)


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage block."""
    out: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                           "total_tokens": prompt_tokens + completion_tokens}
    if reasoning_tokens is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return out


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def describe(errors: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(param, message) of a validation failure: its most specific error, the union-member names dropped from
    where it is (`messages.0.content.0.text`, not `messages.0.content.list[ContentPart].0.text.str`)."""
    if errors[0]["loc"][:1] == ("prompt",):  # a union of four shapes: each member's error would mislead
        return "prompt", ("prompt must be a string, a list of strings, a list of token ids or a list of such "
                          "lists, none of them empty")
    error = max(errors, key=lambda e: len(e["loc"]))
    where = ".".join(str(part) for part in error["loc"] if not _union_tag(part))
    return where or None, f"{where}: {error['msg']}" if where else error["msg"]


def _union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "bool", "float", "list", "dict") or "[" in part)
