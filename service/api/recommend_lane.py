"""POST /v1/recommend's answered path as a thin ASGI adapter, beside FastAPI's route for the same path (issue 26).

The route (service/api/routes/reads.py) stays: it documents the endpoint in OpenAPI and answers every request
this lane passes on. The lane takes a body that validates (pydantic's JSON parser, one pass over the bytes), runs
the same handler and writes the model with pydantic's serializer, without FastAPI's routing, dependency solving,
exception middleware and response re-validation: ~28 % of the HTTP layer's Python per /v1/recommend in a profile
on the 2-core VM, on the event loop's thread that every request shares. Anything else, a body that does not
validate above all, goes to FastAPI unchanged, so its 422s (and every other answer) stay FastAPI's own.
"""

from __future__ import annotations

import time

import orjson
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import to_http
from service.api.handlers import Handlers, Refused
from service.api.http_guard import ARRIVAL, RECOMMEND_PATH
from service.api.schemas import RecommendRequest
from service.auth import READ

JSON = (b"content-type", b"application/json")


class RecommendLane:
    def __init__(self, app: ASGIApp, require_read_key: bool):
        self.app = app
        self.require_read_key = require_read_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != RECOMMEND_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        h: Handlers | None = getattr(scope["app"].state, "handlers", None) if "app" in scope else None
        if h is None:  # starting or stopping: the route answers (503 "service is starting")
            return await self.app(scope, receive, send)
        first = await receive()  # the guard has read the body whole: it replays it as one message
        if first.get("more_body") or first["type"] != "http.request":
            return await self.app(scope, _replay(first, receive), send)
        arrival = scope.get(ARRIVAL) or time.perf_counter()
        try:
            if self.require_read_key:  # before the body, as FastAPI's dependency: a 401 wins over a 422
                h.authorize(Headers(scope=scope).get("authorization"), READ, "recommend", "http")
        except Refused as e:
            return await _refused(send, e, arrival)
        try:
            body = RecommendRequest.model_validate_json(first.get("body", b""))
        except ValidationError:  # FastAPI's 422, word for word
            return await self.app(scope, _replay(first, receive), send)
        try:
            answer = await h.recommend(body, arrival, "http")
        except Refused as e:
            return await _refused(send, e, arrival)
        payload = answer.body.model_dump_json().encode()
        headers = [JSON, (b"content-length", b"%d" % len(payload))]
        if answer.timings is not None:
            headers.append((b"server-timing", answer.timings.server_timing().encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _replay(first: Message, receive: Receive) -> Receive:
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return again


async def _refused(send: Send, e: Refused, arrival: float) -> None:
    """As FastAPI answers the route's HTTPException: {"detail": ...}, the status and its headers."""
    exc = to_http(e, arrival)
    payload = orjson.dumps({"detail": exc.detail})
    headers = [JSON, (b"content-length", b"%d" % len(payload))]
    headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
