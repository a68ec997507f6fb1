"""What the HTTP routes depend on (`Annotated[..., Depends(...)]`): the process's components and handlers, the
request's arrival time, its API key, and how a refusal becomes an HTTP answer; plus the error documentation."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.api.handlers import Handlers, Refused
from service.api.http_guard import ARRIVAL, ENDPOINTS, server_timing_total
from service.api.schemas import ErrorBody
from service.api.validation import InvalidInput
from service.components import Components

__all__ = ["ENDPOINTS"]  # the routes' names, defined beside the guard that counts them first


# The dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency in its thread
# pool, two thread hand-offs per request that under load waited for a core behind the inference threads (issue 26).
async def get_components(request: Request) -> Components:
    c = getattr(request.app.state, "components", None)
    if c is None:
        raise HTTPException(503, "service is starting", headers={"Retry-After": "1"})
    return c


async def get_handlers(request: Request) -> Handlers:
    h = getattr(request.app.state, "handlers", None)
    if h is None:
        raise HTTPException(503, "service is starting", headers={"Retry-After": "1"})
    return h


async def get_arrival(request: Request) -> float:
    return request.scope.get(ARRIVAL) or time.perf_counter()


ComponentsDep = Annotated[Components, Depends(get_components)]
HandlersDep = Annotated[Handlers, Depends(get_handlers)]
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


def to_http(refused: Refused, arrival: float | None = None) -> HTTPException:
    """The HTTP form of a refusal (service.api.errors decides it for HTTP and gRPC alike). With the request's
    `arrival`, a 503 says its server time (`Server-Timing: total`): a shed answer should cost next to nothing."""
    r = refused.refusal
    if r.http_status == 422:
        return HTTPException(422, [InvalidInput(r.field or "body", r.message, r.where).as_error()])
    if r.http_status == 401:
        return HTTPException(401, r.message, headers={"WWW-Authenticate": "Bearer"})
    headers = {"Retry-After": "1"} if r.retry else {}
    if arrival is not None and r.http_status == 503:
        headers["Server-Timing"] = server_timing_total(arrival)
    # A field (409: `items.0.item_id`) names the offending entry, as the gRPC details do.
    return HTTPException(r.http_status, r.grpc_details, headers=headers or None)


def error_doc(description: str, retry_after: bool = False) -> dict:
    doc: dict = {"model": ErrorBody, "description": description}
    if retry_after:
        doc["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return doc


# What a POST /v1/* can answer besides 200 and 422 (FastAPI documents 422 itself).
API_ERRORS: dict[int | str, dict] = {
    400: error_doc("the body is not valid UTF-8"),
    404: error_doc("unknown user: no stored history and none in the request"),
    408: error_doc("the request's head or body did not arrive in time"),
    413: error_doc("the body is over the size limit (max_body_bytes)"),
    415: error_doc("the body is not JSON (content-type must be application/json)"),
    503: error_doc("overloaded, or a dependency (feature store, models) is down: retry after Retry-After", True),
}
# Documents the scheme in OpenAPI; the check itself is KeyRing.check (constant-time, scopes).
BEARER = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`")
AUTH_ERRORS: dict[int | str, dict] = {
    401: error_doc("no API key, or an unknown one"),
    403: error_doc("the API key lacks the scope this endpoint needs"),
}
WRITE_ERRORS: dict[int | str, dict] = {
    **{k: v for k, v in API_ERRORS.items() if k != 404},
    **AUTH_ERRORS,
    409: error_doc("the item already exists or is being added"),
}


def require(scope: str, endpoint: str) -> object:
    """A route dependency: the request's key must carry `scope` (read: only when require_read_key is set)."""

    async def check(
        request: Request, h: HandlersDep, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
    ) -> None:
        try:
            h.authorize(request.headers.get("authorization"), scope, endpoint, "http")
        except Refused as e:
            raise to_http(e) from None  # from None: no key text in any chained trace

    return Depends(check)
