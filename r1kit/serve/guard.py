"""What stands between a hostile client and the app: the key on every route but the open ones, the body limit,
and OpenAI's error shape for every refusal, from the HTTP layer's to an unknown route's."""

from __future__ import annotations

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from r1kit.serve.schemas import describe, error_body

log = logging.getLogger("r1kit.serve")

# open without the key: the chat page (it asks for the key itself), the health probe and the Prometheus metrics (as
# vLLM leaves them: a scraper holds no API key, and counts and timings tell nothing of what was asked);
# /openapi.json and everything else, unknown routes included, need it
OPEN_PATHS = frozenset({"/", "/health", "/metrics"})
# h11 refuses headers past 16 KiB before any route could answer; at this size a 1 MB API key still reaches the
# guard (a JSON 401), and anything larger gets OpenAIH11Protocol's JSON 400
MAX_HEADER_BYTES = 2**21
CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class Guard:
    """ASGI middleware: refuses a request without the key (401) or with a declared body over the limit (413)
    before any route sees it. Plain ASGI rather than FastAPI's `http` middleware, which wraps `receive` and so
    hides a client's disconnect from the route."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int):
        self.app, self.key, self.max_body_bytes = app, api_key.encode() if api_key else None, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope["path"], dict(scope["headers"]))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, path: str, headers: dict[bytes, bytes]) -> JSONResponse | None:
        """The response refusing this request, or None to let it through."""
        if self.key and path not in OPEN_PATHS and not _authorized(headers.get(b"authorization", b""), self.key):
            return JSONResponse(error_body("Incorrect API key provided.", "invalid_request_error",
                                           "invalid_api_key"), status_code=401)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return JSONResponse(error_body(f"request body of {length[:20].decode('latin-1')} bytes is over the "
                                           f"limit of {self.max_body_bytes}", "invalid_request_error",
                                           "body_too_large"), status_code=413)
        return None


def _authorized(header: bytes, key: bytes) -> bool:
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token, key)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the framework raises answers in OpenAI's shape, not FastAPI's `{"detail": ...}`."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path[:200]}: {exc.detail}"
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, kind, CODES.get(exc.status_code)), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = describe(list(exc.errors()))
        return JSONResponse(error_body(message, "invalid_request_error", None, param), status_code=400)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        # a bug, not the client's doing: still a 500, but in the shape clients parse (the traceback is logged)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", "internal_error"),
                            status_code=500)


class OpenAIH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering what it cannot parse (bad framing, headers over h11's 16 KiB, such
    as a 1 MB API key) with a JSON 400 in OpenAI's shape instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        import h11

        body = json.dumps(error_body(f"{msg} (malformed HTTP/1.1, or headers over the size limit)",
                                     "invalid_request_error", "bad_http_request")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
