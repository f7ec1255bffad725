"""The server's error answers: every error is a JSON body with one `detail` line."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": f"internal error ({type(error).__name__}); the server log has the details"},
            status_code=500,
        )
