"""The server's error answers: every error is a JSON body with one `detail` line."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histosearch.errors import HistosearchError
from histosearch.server.uploads import UploadRejected

log = logging.getLogger("histosearch.server")


def _validation_detail(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]  # where the value came from, not which value
        where = ".".join(str(p) for p in loc)
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(error)}, status_code=422)

    @app.exception_handler(UploadRejected)
    async def rejected(_: Request, error: UploadRejected) -> JSONResponse:
        return JSONResponse({"detail": error.reason}, status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        return JSONResponse(
            {"detail": detail}, status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(HistosearchError)
    async def bad_input(_: Request, error: HistosearchError) -> JSONResponse:
        return JSONResponse({"detail": error.reason}, status_code=400)

    app.add_middleware(CatchUnexpected)


class CatchUnexpected:
    """ASGI middleware: an unexpected error is a 500 with one line and the connection stays
    open (Starlette's own handler answers, then raises on, and the server drops it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            if started:  # too late for an answer of its own: the server ends the connection
                raise
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            detail = f"internal error ({type(error).__name__}); the server log has the details"
            await JSONResponse({"detail": detail}, status_code=500)(scope, receive, send)
