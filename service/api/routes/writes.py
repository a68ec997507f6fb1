"""POST /v1/events and /v1/items: behind a `write` key."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import WRITE_ERRORS, ArrivalDep, HandlersDep, IdempotencyKeyDep, require, to_http
from service.api.handlers import Refused
from service.api.schemas import EventsRequest, EventsResponse, ItemsRequest, ItemsResponse
from service.auth import WRITE

router = APIRouter()


@router.post(
    "/v1/events", response_model=EventsResponse, responses=WRITE_ERRORS, dependencies=[require(WRITE, "events")]
)
async def events(
    body: EventsRequest, h: HandlersDep, arrival: ArrivalDep, idempotency_key: IdempotencyKeyDep = None
) -> EventsResponse:
    """Append interactions to users' histories (all of the batch or none); the next request ranks with them."""
    try:
        return (await h.record_events(body, idempotency_key, "http")).body
    except Refused as e:
        raise to_http(e, arrival) from e


@router.post(
    "/v1/items",
    status_code=202,
    response_model=ItemsResponse,
    responses=WRITE_ERRORS,
    dependencies=[require(WRITE, "items")],
)
async def items(body: ItemsRequest, h: HandlersDep, arrival: ArrivalDep) -> ItemsResponse:
    """New items from their text: embedded by the ingestion worker, then servable on every replica."""
    try:
        return (await h.add_items(body, "http")).body
    except Refused as e:
        raise to_http(e, arrival) from e
