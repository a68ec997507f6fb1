"""FastAPI app factory. Singletons live in `app.state` and are closed in the lifespan context; routes
depend on them through `Annotated[..., Depends(...)]`. HTTP is only the entrypoint: the work is in
service.pipeline.recommender, behind the narrow inference interface."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.auth import READ, WRITE, AuthError, KeyRing
from service.api.errors import refusal
from service.api.http_guard import ARRIVAL, GuardMiddleware
from service.api.schemas import (
    ErrorBody,
    EventsRequest,
    EventsResponse,
    ItemsRequest,
    ItemsResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    ScoreRequest,
    ScoreResponse,
    UserInput,
)
from service.api.validation import (
    InvalidInput,
    check_events,
    check_items,
    check_recommend,
    check_score,
    document_limits,
    field_errors,
)
from service.artifacts import ArtifactPaths, config_name
from service.backends.base import InferenceBackend
from service.backends.onnx import OnnxBackend
from service.contract import Manifest
from service.ingest.feed import ItemFeed, PipeFeed, RedisFeed
from service.ingest.live import LiveData
from service.metrics import Metrics
from service.pipeline.catalog import Catalog
from service.pipeline.item_tokens import ItemTokens
from service.pipeline.recommender import Recommender
from service.pipeline.retrieval import Retriever
from service.redact import redact, redact_tree
from service.settings import Settings
from service.stores.base import FeatureStore
from service.stores.memory import InProcessStore
from service.stores.redis import RedisStore

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("falconrec.app")


@dataclass
class Components:
    settings: Settings
    manifest: Manifest
    backend: InferenceBackend
    fallback: InferenceBackend | None
    store: FeatureStore
    retriever: Retriever
    recommender: Recommender
    metrics: Metrics
    keys: KeyRing
    live: LiveData
    grpc_server: object | None = None


async def build_components(settings: Settings) -> Components:
    keys = KeyRing.from_settings(settings)  # first: a malformed key entry stops startup before any loading
    repo = Path(settings.model_repository)
    manifest = Manifest.read(repo)
    if manifest.config != config_name(settings.config):
        log.warning(
            "repository %s holds config %r, not %r: serving %r", repo, manifest.config, settings.config, manifest.config
        )
    paths = ArtifactPaths.for_config(manifest.config, settings.artifacts_dir)
    catalog = Catalog.load(paths.data)
    metrics = Metrics()
    onnx = OnnxBackend(
        repo,
        manifest.dims,
        settings.onnx_providers,
        settings.intra_op_threads,
        settings.inference_threads,
        trt_cache=paths.root / "trt_cache",
        tf32=settings.cuda_tf32,
    )
    backend: InferenceBackend = onnx
    fallback = None
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        backend = TritonBackend.from_settings(settings, manifest.dims)
        fallback = onnx if settings.triton_fallback else None
    store: FeatureStore
    if settings.redis_url:
        store = RedisStore(
            settings.redis_url,
            manifest.dims.content_dim,
            settings.redis_timeout_ms / 1000,
            settings.embedding_cache_items,
            settings.redis_retry_s,
            settings.history_cache_users,
        )
        await store.start()
    else:
        store = InProcessStore(catalog, np.load(paths.content_emb).astype(np.float32))
    retriever = Retriever(paths.index_dir, threads=settings.faiss_threads)
    if retriever.meta.get("model_version") != manifest.model_version:
        raise RuntimeError(
            f"FAISS index in {paths.index_dir} belongs to model {retriever.meta.get('model_version')}, "
            f"repository {repo} to {manifest.model_version}: rebuild (`falconrec build`)"
        )
    tokens = ItemTokens.load(paths.index_dir)
    if tokens.model_version != manifest.model_version or tokens.rows != catalog.num_items + 1:
        raise RuntimeError(
            f"ranker tokens in {paths.index_dir} do not match model {manifest.model_version} and its "
            f"{catalog.num_items} items: rebuild (`falconrec build`)"
        )
    rec = Recommender(settings, manifest, catalog, backend, store, retriever, metrics, tokens, fallback)
    await rec.warmup()
    live = LiveData(settings, manifest, catalog, backend, store, retriever, metrics, tokens, fallback)
    feed: ItemFeed
    if isinstance(store, RedisStore):
        feed = RedisFeed(settings, manifest.dims.content_dim, live.apply, lambda: store.version, live.metrics)
    else:
        feed = PipeFeed(settings, manifest.dims.content_dim, live.apply, live.metrics)
    live.feed = feed
    await feed.start()  # replays the items added live so far (Redis), before the first request
    return Components(settings, manifest, backend, fallback, store, retriever, rec, metrics, keys, live)


async def close_components(c: Components) -> None:
    if c.grpc_server is not None:
        await c.grpc_server.stop(grace=1.0)
    await c.live.close()  # stops the worker this replica started
    await c.recommender.close()  # the batcher's dispatch loop, before the backend it calls
    await c.store.close()
    await c.backend.close()
    if c.fallback is not None:
        await c.fallback.close()


# --- dependencies -----------------------------------------------------------------------------------
def get_components(request: Request) -> Components:
    c = getattr(request.app.state, "components", None)
    if c is None:
        raise HTTPException(503, "service is starting", headers={"Retry-After": "1"})
    return c


ComponentsDep = Annotated[Components, Depends(get_components)]


def get_arrival(request: Request) -> float:
    return request.scope.get(ARRIVAL) or time.perf_counter()


ArrivalDep = Annotated[float, Depends(get_arrival)]
# Checked by service.api.validation (one rule for HTTP and gRPC), documented here.
IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="1-128 visible ASCII characters. Entries without an event_id get one derived from this key and "
        "their index, so a retried batch (same key, same body) is written once",
    ),
]


def _history(body: UserInput) -> list[tuple[int, int]] | None:
    return [(h.item_id, h.ts) for h in body.history] if body.history else None


def _refuse(e: Exception, endpoint: str, metrics: Metrics) -> HTTPException:
    """The HTTP answer for a pipeline exception (service.api.errors decides it for HTTP and gRPC alike)."""
    r = refusal(e)
    if r is None:
        raise e  # a bug: the guard answers 500 and logs it
    if r.shed:
        metrics.shed.labels(endpoint).inc()
    if r.http_status == 422:
        return HTTPException(422, [InvalidInput(r.field or "body", r.message, r.where).as_error()])
    if r.http_status == 401:
        return HTTPException(401, r.message, headers={"WWW-Authenticate": "Bearer"})
    # A field (409: `items.0.item_id`) names the offending entry, as the gRPC details do.
    return HTTPException(r.http_status, r.grpc_details, headers={"Retry-After": "1"} if r.retry else None)


def _error(description: str, retry_after: bool = False) -> dict:
    doc: dict = {"model": ErrorBody, "description": description}
    if retry_after:
        doc["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return doc


# What a POST /v1/* can answer besides 200 and 422 (FastAPI documents 422 itself).
API_ERRORS: dict[int | str, dict] = {
    400: _error("the body is not valid UTF-8"),
    404: _error("unknown user: no stored history and none in the request"),
    413: _error("the body is over the size limit (max_body_bytes)"),
    415: _error("the body is not JSON (content-type must be application/json)"),
    503: _error("overloaded, or a dependency (feature store, models) is down: retry after Retry-After", True),
}


# Documents the scheme in OpenAPI; the check itself is KeyRing.check (constant-time, scopes).
BEARER = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")
AUTH_ERRORS: dict[int | str, dict] = {
    401: _error("no API key, or an unknown one"),
    403: _error("the API key lacks the scope this endpoint needs"),
}
WRITE_ERRORS: dict[int | str, dict] = {
    **{k: v for k, v in API_ERRORS.items() if k != 404},
    **AUTH_ERRORS,
    409: _error("the item already exists or is being added"),
}


def require(scope: str) -> object:
    """A route dependency: the request's key must carry `scope` (read: only when require_read_key is set)."""

    async def check(
        request: Request, c: ComponentsDep, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> None:
        try:
            c.keys.check(request.headers.get("authorization"), scope)
        except AuthError as e:
            raise _refuse(e, request.url.path, c.metrics) from None  # from None: no key text in any chained trace

    return Depends(check)


def create_app(settings: Settings | None = None, components: Components | None = None) -> FastAPI:
    settings = settings or Settings()
    live: dict[str, Metrics] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        c = components or await build_components(settings)
        live["metrics"] = c.metrics
        if settings.grpc_port and c.grpc_server is None:
            from service.api.grpc_server import start_grpc

            c.grpc_server = await start_grpc(c, settings.host, settings.grpc_port)
        app.state.components = c
        log.info(
            "serving %s model %s (%s, %s store)",
            c.manifest.config,
            c.manifest.model_version,
            c.backend.name,
            c.store.name,
        )
        try:
            yield
        finally:
            app.state.components = None
            await close_components(c)

    app = FastAPI(
        title="falconrec",
        version="0.1.0",
        lifespan=lifespan,
        description="LLM-embedding two-tower recall + HSTU ranking (M-FALCON) within a latency budget.",
    )
    app.add_middleware(GuardMiddleware, settings=settings, metrics=lambda: live.get("metrics"))

    def openapi() -> dict:
        # The limits from settings go into the document: what it says is what validation enforces.
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = document_limits(doc, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": field_errors(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # outside the guard only; no stack traces leak
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "pid": os.getpid()}  # pid: which worker answered (serve --workers)

    @app.get("/readyz", responses={503: _error("starting")})
    async def readyz(request: Request) -> JSONResponse:
        c = getattr(request.app.state, "components", None)
        if c is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        store = c.store.status()
        backend_ok = await c.backend.ready()
        reasons = []
        if not store.get("ok"):
            reasons.append(f"store {store['store']} unavailable: {store.get('error')}")
        if not backend_ok:
            reasons.append(f"backend {c.backend.name} unavailable" + (", using fallback" if c.fallback else ""))
        if ingest := c.live.problem():
            reasons.append(ingest)
        # Operators' detail stays, without addresses, paths or credentials (describe() lists URLs and dirs).
        return JSONResponse(
            redact_tree(
                {
                    "status": "degraded" if reasons else "ok",
                    "reasons": reasons,
                    "model_version": c.manifest.model_version,
                    "config": c.manifest.config,
                    "backend": c.backend.describe(),
                    "fallback": c.fallback.describe() if c.fallback else None,
                    "index": c.retriever.describe(),
                    "store": store,
                    "live": c.live.status(),
                }
            )
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
    )
    async def metrics_endpoint(c: ComponentsDep) -> Response:
        return Response(c.metrics.render(), media_type="text/plain; version=0.0.4")

    read_auth = [require(READ)] if settings.require_read_key else []
    read_errors = {**API_ERRORS, **AUTH_ERRORS} if settings.require_read_key else API_ERRORS

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=read_errors, dependencies=read_auth)
    async def recommend(
        body: RecommendRequest, c: ComponentsDep, arrival: ArrivalDep, response: Response
    ) -> RecommendResponse:
        try:
            deadline = check_recommend(body, c.settings, arrival)
            res = await c.recommender.recommend(
                body.user_id, _history(body), body.k, body.exclude_seen, body.num_candidates, deadline, body.query_ts
            )
        except Exception as e:  # noqa: BLE001 - _refuse re-raises what it does not know
            raise _refuse(e, "/v1/recommend", c.metrics) from e
        response.headers["Server-Timing"] = res.timings.server_timing()
        c.metrics.stages(res.timings.stages)
        c.metrics.request_latency.labels("recommend").observe(time.perf_counter() - arrival)
        if res.degraded:
            c.metrics.degraded.labels("recommend").inc()
        return RecommendResponse(
            items=[ScoredItem(**i) for i in res.items],
            model_version=c.manifest.model_version,
            degraded=bool(res.degraded),
            degraded_reasons=[redact(r) for r in res.degraded],
            candidates_recalled=res.candidates_recalled,
            candidates_ranked=res.candidates_ranked,
            timings_ms={k: round(v, 3) for k, v in res.timings.stages.items()},
        )

    @app.post("/v1/score", response_model=ScoreResponse, responses=read_errors, dependencies=read_auth)
    async def score(body: ScoreRequest, c: ComponentsDep, arrival: ArrivalDep, response: Response) -> ScoreResponse:
        try:
            deadline = check_score(body, c.settings, arrival)
            scores, deg, tm = await c.recommender.score(
                body.user_id, _history(body), body.item_ids, deadline, body.query_ts
            )
        except Exception as e:  # noqa: BLE001 - _refuse re-raises what it does not know
            raise _refuse(e, "/v1/score", c.metrics) from e
        response.headers["Server-Timing"] = tm.server_timing()
        c.metrics.request_latency.labels("score").observe(time.perf_counter() - arrival)
        if deg:
            c.metrics.degraded.labels("score").inc()
        return ScoreResponse(
            scores=[ScoredItem(item_id=i, score=float(v)) for i, v in zip(body.item_ids, scores, strict=True)],
            model_version=c.manifest.model_version,
            degraded=bool(deg),
            degraded_reasons=[redact(r) for r in deg],
            timings_ms={k: round(v, 3) for k, v in tm.stages.items()},
        )

    @app.post("/v1/events", response_model=EventsResponse, responses=WRITE_ERRORS, dependencies=[require(WRITE)])
    async def events(
        body: EventsRequest, c: ComponentsDep, idempotency_key: IdempotencyKeyDep = None
    ) -> EventsResponse:
        """Append interactions to users' histories (all of the batch or none); the next request ranks with them."""
        try:
            known = c.recommender.catalog.index_of.__contains__
            evs = check_events(body, c.settings, known, time.time(), idempotency_key)
            out = await c.live.record_events(evs)
        except Exception as e:  # noqa: BLE001 - _refuse re-raises what it does not know
            raise _refuse(e, "/v1/events", c.metrics) from e
        return EventsResponse(written=out.written, duplicates=out.duplicates, users=out.users)

    @app.post(
        "/v1/items",
        status_code=202,
        response_model=ItemsResponse,
        responses=WRITE_ERRORS,
        dependencies=[require(WRITE)],
    )
    async def items(body: ItemsRequest, c: ComponentsDep) -> ItemsResponse:
        """New items from their text: embedded by the ingestion worker, then servable on every replica."""
        try:
            check_items(body, c.settings)
            jobs = c.live.jobs(body.items, time.time())
            await c.live.submit(jobs)
        except Exception as e:  # noqa: BLE001 - _refuse re-raises what it does not know
            raise _refuse(e, "/v1/items", c.metrics) from e
        return ItemsResponse(accepted=[j.item_id for j in jobs], status="queued")

    return app


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for `app` (the server and the tests' servers alike): httptools with read deadlines and
    the per-address limit on incomplete requests (service.api.http_protocol)."""
    import uvicorn

    from service.api.http_protocol import protocol_for

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        loop="auto",
        http=protocol_for(settings),
    )


async def serve(settings: Settings, sockets: list | None = None) -> None:
    """HTTP (uvicorn) and gRPC in one process and one event loop (on `sockets` when a parent bound them)."""
    import uvicorn

    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    log.info("HTTP on http://%s:%d  gRPC on %s:%d", settings.host, settings.port, settings.host, settings.grpc_port)
    await server.serve(sockets=sockets)


def run(settings: Settings) -> None:
    if settings.workers > 1:
        from service.api.workers import run_workers

        raise SystemExit(run_workers(settings))
    asyncio.run(serve(settings))
