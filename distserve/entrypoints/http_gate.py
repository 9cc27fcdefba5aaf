"""What every HTTP request passes before a route (plain ASGI middleware): the API key (401),
the body size limit (413), and, while the server drains for shutdown, a 503 with
Retry-After. It reads a request's body itself, so that a route's `is_disconnected()` still
sees the client go away (Starlette's BaseHTTPMiddleware hides that from it)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from distserve.entrypoints.openai_responses import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RETRY_AFTER_SECONDS = 5


class HTTPGate:
    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body_bytes: int, draining: Callable[[], bool], on_refused: Callable[[str], None]
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.draining = draining
        self.on_refused = on_refused  # counts a refused request in the metrics, by outcome

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        protected = path.startswith("/v1") or path in ("/generate", "/reset_prefix_cache")
        if protected and self.api_key and _header(scope, b"authorization") != f"Bearer {self.api_key}".encode():
            await _error(send, 401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", "AuthenticationError",
                         code="invalid_api_key")
            return
        if protected and self.draining():
            self.on_refused("rejected")
            await _error(send, 503, "The server is shutting down; retry on another server.", "ServiceUnavailableError",
                         headers=[(b"retry-after", str(RETRY_AFTER_SECONDS).encode())])
            return
        body, too_large = await self._read_body(scope, receive)
        if too_large:
            self.on_refused("rejected")
            await _error(send, 413, f"The request body is larger than this server's limit of {self.max_body_bytes} bytes "
                         "(--max-request-bytes).", "invalid_request_error")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, bool]:
        """The whole body, unless it grows past the limit (stopped reading there)."""
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return b"", True
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the client's own channel (whose next message is its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value
    return None


async def _error(send: Send, status: int, message: str, type_: str, code: str | None = None,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
