"""The ASGI application: routes, API key, body size limit, and errors in OpenAI's shape.

`create_app(settings)` builds a FastAPI app over a `ModelRegistry`. Every route under `/v1` and
`/api` requires `Authorization: Bearer KEY` when `settings.api_key` is set; `/health`, the page
(`/`) and its static files do not (they hold no data: the page asks for the key and sends it).
Anything a client gets wrong is a 4xx JSON error; an unexpected exception is logged here and
answered as a 500 JSON error without a traceback.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinylm.serve import completions, dashboard, sweep_page
from tinylm.serve.protocol import ApiError, error_body, validation_message
from tinylm.serve.registry import DEFAULT_MAX_MODELS, ModelRegistry

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("tinylm.serve")


@dataclass
class ServeSettings:
    """What `tinylm serve` was asked for."""

    root: Path
    api_key: str | None = None
    truncate: bool = False
    max_body_bytes: int = 1 << 20  # 1 MiB: a completion request is a prompt of <= context ids
    max_batch: int = 16
    auto_reload: bool = True
    device: str = "cpu"
    max_models: int = DEFAULT_MAX_MODELS


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, before reading them when the
    Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                # An HTTPException passes through FastAPI's body parsing (anything else would
                # become a 400) to the app's handler, which answers 413.
                raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes: send a smaller one"

    async def _refuse(self, send: Send) -> None:
        body = error_body(self._message(), code="request_too_large")
        await JSONResponse(status_code=413, content=body)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _require_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII strings (a header of any bytes was a 500).
    # Starlette decodes headers as latin-1, so this gives back the bytes the client sent.
    given_bytes = given.strip().encode("latin-1", "replace")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given_bytes, key.encode()):
        raise ApiError(
            401,
            "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )


def create_app(settings: ServeSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """The server's ASGI app (see the module docstring)."""
    registry = registry or ModelRegistry(
        settings.root,
        device=settings.device,
        max_batch=settings.max_batch,
        auto_reload=settings.auto_reload,
        max_models=settings.max_models,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        registry.close()

    app = FastAPI(title="tinylm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    keyed = [Depends(_require_key)]
    app.include_router(completions.router, dependencies=keyed)
    app.include_router(dashboard.router, dependencies=keyed)
    app.include_router(sweep_page.api_router, dependencies=keyed)
    app.include_router(sweep_page.page_router)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(status_code=e.status, content=e.body())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(e.errors()))
        return JSONResponse(status_code=400, content=error_body(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 413: "request_too_large"}.get(e.status_code)
        return JSONResponse(status_code=e.status_code, content=error_body(str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            status_code=500,
            content=error_body(f"internal error ({type(e).__name__})", type="server_error"),
        )

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "memory": registry.memory(),
            "models": {
                s.model_id: {
                    "checkpoint": s.checkpoint.name,
                    "parameter_bytes": s.parameter_bytes,
                    **vars(s.engine.stats),
                }
                for s in registry.loaded()
            },
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
