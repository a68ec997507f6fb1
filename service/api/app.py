"""FastAPI app factory. The components and the handlers live in `app.state`, built and closed in the lifespan;
the routes (service/api/routes/, one router per resource) depend on them through `Annotated[..., Depends(...)]`.
HTTP is only an adapter: the work is in service.api.handlers, which gRPC calls too."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from service.api.deps import ENDPOINTS
from service.api.handlers import Handlers
from service.api.http_guard import GuardMiddleware
from service.api.recommend_lane import RecommendLane
from service.api.routes import health, reads, writes
from service.api.validation import document_limits, field_errors
from service.components import Components, build_components, close_components
from service.settings import Settings

log = logging.getLogger("falconrec.app")


def create_app(settings: Settings | None = None, components: Components | None = None) -> FastAPI:
    settings = settings or Settings()
    live: dict[str, Components] = {}  # the guard runs outside the lifespan's scope: it reads them from here

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        c = components or await build_components(settings)
        live["components"] = c
        handlers = Handlers(c)
        app.state.components, app.state.handlers = c, handlers
        if settings.grpc_port and c.grpc_server is None:
            from service.api.grpc_server import start_grpc

            c.grpc_server = await start_grpc(c, handlers, settings.host, settings.grpc_port)
        log.info(
            "serving %s model %s (%s, %s store%s)",
            c.manifest.config,
            c.manifest.model_version,
            c.backend.name,
            c.store.name,
            f"; int8: {', '.join(c.manifest.int8)}" if c.manifest.int8 else "",
        )
        try:
            yield
        finally:
            app.state.components = app.state.handlers = None
            await close_components(c)

    app = FastAPI(
        title="falconrec",
        version="0.1.0",
        lifespan=lifespan,
        description="LLM-embedding two-tower recall + HSTU ranking (M-FALCON) within a latency budget.",
    )
    # Added first, so inside the guard (which reads the body, sheds and counts): see recommend_lane.py.
    app.add_middleware(RecommendLane, require_read_key=settings.require_read_key)
    app.add_middleware(
        GuardMiddleware,
        settings=settings,
        metrics=lambda: c.metrics if (c := live.get("components")) else None,
        admission=lambda: c.recommender.admission if (c := live.get("components")) else None,
    )

    def openapi() -> dict:
        # The limits from settings go into the document: what it says is what validation enforces.
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = document_limits(doc, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # FastAPI refused the body before any handler ran: counted here as the handlers count theirs.
        c = getattr(request.app.state, "components", None)
        if c is not None and (endpoint := ENDPOINTS.get(request.url.path)):
            c.metrics.answers.labels(endpoint, "http", "422").inc()
        return JSONResponse({"detail": field_errors(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # outside the guard only; no stack traces leak
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    app.include_router(health.router)
    app.include_router(reads.router(settings.require_read_key))
    app.include_router(writes.router)
    return app
