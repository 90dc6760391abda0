"""What every HTTP request passes before the app sees it: the Host header, the API key, the body size.

Pure ASGI (no framework), so a refused request costs no JSON parsing and no tokenising: a body over
the limit is refused by its ``Content-Length`` or, without one, as soon as the bytes read exceed it.
Refusals are OpenAI-style JSON error objects."""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class GateConfig:
    api_key: str | None = None
    """Required as ``Authorization: Bearer <key>`` on every ``/v1/*`` route when set."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names a request's ``Host`` header may carry (against DNS rebinding); empty: any."""
    max_body_bytes: int = 4 << 20


class Gate:
    def __init__(self, app: ASGIApp, config: GateConfig) -> None:
        self.app, self.config = app, config
        self.key = None if config.api_key is None else config.api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            return await _reply(send, *refusal)
        length = headers.get("content-length", b"")
        if length.isdigit() and int(length) > self.config.max_body_bytes:
            return await _reply(send, *self._too_large())
        body = await self._read_body(receive)
        if body is None:
            return await _reply(send, *self._too_large())
        return await self.app(scope, _replay(body, receive), send)

    def _refusal(self, path: str, headers: dict[str, bytes]) -> tuple[int, str, str] | None:
        hosts = self.config.allowed_hosts
        if hosts and _host_name(headers.get("host", b"")) not in hosts:
            return 400, "Host header not allowed on this server (--allowed-hosts)", "invalid_host"
        if self.key is not None and path.startswith("/v1/"):
            scheme, _, given = headers.get("authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                return 401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key"
        return None

    def _too_large(self) -> tuple[int, str, str]:
        return 413, f"request body over this server's limit of {self.config.max_body_bytes} bytes", "body_too_large"

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it exceeds the limit (the rest is not read)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then waits on the real one
    (which reports a client disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _host_name(host: bytes) -> str:
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):  # [::1]:8000
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
