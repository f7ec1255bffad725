"""JSON request bodies checked before any route parses them: at most MAX_JSON_BYTES, nested
at most MAX_JSON_DEPTH deep (a parser would recurse once per level: 100,000 levels are a
RecursionError, not an answer)."""

from __future__ import annotations

import re

import numpy as np
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
# A JSON string as the parser reads one (escapes included), or an unterminated one to the
# end: brackets inside do not nest. Possessive, so that the scan is linear in the body.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


class BodyRefused(ValueError):
    """A JSON body the server will not parse; `status` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a scalar), without parsing
    it; for malformed text, at least the depth a parser would reach before failing."""
    steps = _OPEN[np.frombuffer(_STRING.sub(b'""', body), np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def is_json(headers: Headers) -> bool:
    """Whether FastAPI would parse the body as JSON: no content type, or a JSON one."""
    content_type = headers.get("content-type")
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def check_json(body: bytes) -> None:
    """Refuse a body over the size or depth limit with the reason."""
    if len(body) > MAX_JSON_BYTES:
        raise BodyRefused(413, f"a JSON body is at most {MAX_JSON_BYTES // 2**20} MB")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise BodyRefused(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels is refused")


class JsonLimits:
    """ASGI middleware: reads a JSON request body whole (stopping past MAX_JSON_BYTES), checks
    it with `check_json` and hands it on, or answers the refusal itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not is_json(headers):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > MAX_JSON_BYTES:
                break
        try:
            check_json(bytes(body))
        except BodyRefused as refused:
            # A body cut short leaves unread bytes on the connection: the client must not
            # send its next request on it.
            close = {"Connection": "close"} if more else None
            response = JSONResponse({"detail": refused.reason}, refused.status, headers=close)
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` once, then waits on the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
