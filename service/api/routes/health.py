"""GET /healthz (the process answers), /readyz (models, index, store, live items), /metrics (Prometheus)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from service.api.deps import ComponentsDep, error_doc
from service.redact import redact_tree

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok", "pid": os.getpid()}  # pid: which worker answered (serve --workers)


@router.get("/readyz", responses={503: error_doc("starting")})
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
    if c.watcher is not None and c.watcher.refused:  # CURRENT names a version this process cannot serve
        reasons += [f"not serving version {v}: {why}" for v, why in c.watcher.refused.items()]
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
                "versions": c.watcher.describe() if c.watcher is not None else None,
            }
        )
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
)
async def metrics_endpoint(c: ComponentsDep) -> Response:
    return Response(c.metrics.render(), media_type="text/plain; version=0.0.4")
