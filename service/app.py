"""FastAPI app factory. Singletons live in `app.state` and are closed in the lifespan context; routes
depend on them through `Annotated[..., Depends(...)]`. HTTP is only the entrypoint: the work is in
service.recommender, behind the narrow inference interface."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.artifacts import ArtifactPaths
from service.catalog import Catalog
from service.contract import Manifest
from service.deadline import Deadline
from service.inference import BackendUnavailable, InferenceBackend
from service.metrics import Metrics
from service.onnx_backend import OnnxBackend
from service.recommender import BadRequest, Overloaded, Recommender, UnknownUser
from service.retrieval import Retriever
from service.schemas import RecommendRequest, RecommendResponse, ScoredItem, ScoreRequest, ScoreResponse, UserInput
from service.settings import Settings
from service.stores import FeatureStore, InProcessStore, RedisStore

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
    grpc_server: object | None = None


async def build_components(settings: Settings) -> Components:
    repo = Path(settings.model_repository)
    manifest = Manifest.read(repo)
    if manifest.config != settings.config:
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
        settings.inference_workers,
        trt_cache=paths.root / "trt_cache",
    )
    backend: InferenceBackend = onnx
    fallback = None
    if settings.backend == "triton":
        from service.triton_backend import TritonBackend

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
    rec = Recommender(settings, manifest, catalog, backend, store, retriever, metrics, fallback)
    await rec.warmup()
    return Components(settings, manifest, backend, fallback, store, retriever, rec, metrics)


async def close_components(c: Components) -> None:
    if c.grpc_server is not None:
        await c.grpc_server.stop(grace=1.0)
    await c.store.close()
    await c.backend.close()
    if c.fallback is not None:
        await c.fallback.close()


# --- middleware -------------------------------------------------------------------------------------
ARRIVAL = "falconrec.arrival"  # ASGI scope key: perf_counter() when the request reached the service


class GuardMiddleware:
    """Bounded concurrency (503 + Retry-After at once when full) and a request-body size cap (413)."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics_ref: dict):
        self.app = app
        self.s = settings
        self.inflight = 0
        self.metrics_ref = metrics_ref

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.s.max_body_bytes:
            return await self._reply(send, 413, {"detail": f"request body over {self.s.max_body_bytes} bytes"})
        if self.inflight >= self.s.max_concurrency:
            m = self.metrics_ref.get("metrics")
            if m:
                m.shed.labels(scope["path"]).inc()
            return await self._reply(
                send,
                503,
                {"detail": "overloaded: too many requests in flight, retry shortly"},
                [(b"retry-after", b"1")],
            )
        self.inflight += 1
        scope[ARRIVAL] = time.perf_counter()  # the budget counts from here, not from when the handler starts
        received = 0

        async def capped_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.s.max_body_bytes:
                    raise BodyTooLarge
            return msg

        try:
            await self.app(scope, capped_receive, send)
        except BodyTooLarge:
            await self._reply(send, 413, {"detail": f"request body over {self.s.max_body_bytes} bytes"})
        finally:
            self.inflight -= 1

    @staticmethod
    async def _reply(send: Send, status: int, body: dict, extra: list | None = None) -> None:
        import orjson

        payload = orjson.dumps(body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    *(extra or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class BodyTooLarge(Exception):
    pass


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


def _unprocessable(field: str, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def _check_user_input(body: UserInput, s: Settings, arrival: float) -> Deadline:
    if body.history is not None and len(body.history) > s.max_history:
        raise _unprocessable("history", f"history has {len(body.history)} items; the limit is {s.max_history}")
    if body.history is not None and len(body.history) == 0 and body.user_id is None:
        raise _unprocessable("history", "history is empty and no user_id was given")
    if body.user_id is None and body.history is None:
        raise _unprocessable("user_id", "give a user_id or a history")
    budget = body.budget_ms or s.budget_ms
    if budget > s.max_budget_ms:
        raise _unprocessable("budget_ms", f"budget_ms {budget} is over the cap of {s.max_budget_ms}")
    return Deadline(budget / 1000.0, start=arrival)


def _history(body: UserInput) -> list[tuple[int, int]] | None:
    return [(h.item_id, h.ts) for h in body.history] if body.history else None


def create_app(settings: Settings | None = None, components: Components | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics_ref: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        c = components or await build_components(settings)
        metrics_ref["metrics"] = c.metrics
        if settings.grpc_port and c.grpc_server is None:
            from service.grpc_server import start_grpc

            c.grpc_server = await start_grpc(c, settings.host, settings.grpc_port)
        app.state.components = c
        log.info(
            "serving %s model %s (%s, %s store)",
            c.manifest.config,
            c.manifest.model_version,
            c.backend.describe(),
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
    app.add_middleware(GuardMiddleware, settings=settings, metrics_ref=metrics_ref)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [
            {"loc": list(e.get("loc", [])), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # no stack traces leak
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
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
        return JSONResponse(
            {
                "status": "degraded" if reasons else "ok",
                "reasons": reasons,
                "model_version": c.manifest.model_version,
                "config": c.manifest.config,
                "backend": c.backend.describe(),
                "fallback": c.fallback.describe() if c.fallback else None,
                "index": c.retriever.describe(),
                "store": store,
            }
        )

    @app.get("/metrics")
    async def metrics_endpoint(c: ComponentsDep) -> Response:
        return Response(c.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(
        body: RecommendRequest, c: ComponentsDep, arrival: ArrivalDep, response: Response
    ) -> RecommendResponse:
        s = c.settings
        deadline = _check_user_input(body, s, arrival)
        if body.k > s.max_k:
            raise _unprocessable("k", f"k={body.k} is over the limit of {s.max_k}")
        if body.num_candidates is not None and body.num_candidates > s.max_candidates:
            raise _unprocessable("num_candidates", f"num_candidates={body.num_candidates} is over {s.max_candidates}")
        try:
            res = await c.recommender.recommend(
                body.user_id, _history(body), body.k, body.exclude_seen, body.num_candidates, deadline, body.query_ts
            )
        except UnknownUser as e:
            raise HTTPException(404, str(e)) from e
        except BadRequest as e:
            raise _unprocessable(e.field, str(e)) from e
        except Overloaded as e:
            c.metrics.shed.labels("/v1/recommend").inc()
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from e
        except (TimeoutError, BackendUnavailable) as e:
            c.metrics.shed.labels("/v1/recommend").inc()
            raise HTTPException(
                503, f"models unavailable ({type(e).__name__}), retry shortly", headers={"Retry-After": "1"}
            ) from e
        response.headers["Server-Timing"] = res.timings.server_timing()
        c.metrics.stages(res.timings.stages)
        c.metrics.request_latency.labels("recommend").observe(time.perf_counter() - arrival)
        if res.degraded:
            c.metrics.degraded.labels("recommend").inc()
        return RecommendResponse(
            items=[ScoredItem(**i) for i in res.items],
            model_version=c.manifest.model_version,
            degraded=bool(res.degraded),
            degraded_reasons=res.degraded,
            candidates_recalled=res.candidates_recalled,
            candidates_ranked=res.candidates_ranked,
            timings_ms={k: round(v, 3) for k, v in res.timings.stages.items()},
        )

    @app.post("/v1/score", response_model=ScoreResponse)
    async def score(body: ScoreRequest, c: ComponentsDep, arrival: ArrivalDep, response: Response) -> ScoreResponse:
        s = c.settings
        deadline = _check_user_input(body, s, arrival)
        if len(body.item_ids) > s.max_score_items:
            raise _unprocessable("item_ids", f"{len(body.item_ids)} item ids; the limit is {s.max_score_items}")
        try:
            scores, deg, tm = await c.recommender.score(
                body.user_id, _history(body), body.item_ids, deadline, body.query_ts
            )
        except UnknownUser as e:
            raise HTTPException(404, str(e)) from e
        except BadRequest as e:
            raise _unprocessable(e.field, str(e)) from e
        except Overloaded as e:
            c.metrics.shed.labels("/v1/score").inc()
            raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from e
        except (TimeoutError, BackendUnavailable) as e:
            raise HTTPException(503, "scoring did not finish within the budget", headers={"Retry-After": "1"}) from e
        response.headers["Server-Timing"] = tm.server_timing()
        c.metrics.request_latency.labels("score").observe(time.perf_counter() - arrival)
        return ScoreResponse(
            scores=[ScoredItem(item_id=i, score=float(v)) for i, v in zip(body.item_ids, scores, strict=True)],
            model_version=c.manifest.model_version,
            degraded=bool(deg),
            degraded_reasons=deg,
            timings_ms={k: round(v, 3) for k, v in tm.stages.items()},
        )

    return app


async def serve(settings: Settings) -> None:
    """HTTP (uvicorn) and gRPC in one process and one event loop."""
    import uvicorn

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="warning", access_log=False, loop="auto", http="auto"
    )
    server = uvicorn.Server(config)
    log.info("HTTP on http://%s:%d  gRPC on %s:%d", settings.host, settings.port, settings.host, settings.grpc_port)
    await server.serve()


def run(settings: Settings) -> None:
    asyncio.run(serve(settings))
