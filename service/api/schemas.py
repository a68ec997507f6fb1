"""Request/response bodies (HTTP, and gRPC requests are converted into them: one validation for both).

Static bounds live here; limits from settings are checked and documented by service.api.validation.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from service.ids import MAX_ID_CHARS

# Ids and times are int64 in the models, the store and the proto: a larger JSON integer must be a 422,
# not an overflow deep in numpy (it answered 500).
INT64_MAX = 2**63 - 1
# Request bodies are strict: `true` or `"1"` where an id, a time or a count belongs is a 422 (lax mode wrote
# user 1, item 1, ts 0 for `{"user_id": true, "item_id": true, "ts": false}`). A JSON integer is still a valid
# float (budget_ms: 5). gRPC requests reach the same models, already typed by the proto.
STRICT = ConfigDict(extra="forbid", strict=True)
# The catalog's own ids (service/ids.py): integers, or strings for a catalog built with string ids. Strict: a JSON
# string stays a string ("12" is the SKU "12"), a JSON integer an integer.
IntId = Annotated[int, Field(ge=0, le=INT64_MAX)]
StrId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Id = IntId | StrId
ItemId = Annotated[Id, Field(description="catalog item id: an integer, or a string in a string-id catalog")]
UserId = Annotated[Id, Field(description="user id: an integer, or a string in a catalog built with string user ids")]


class HistoryItem(BaseModel):
    model_config = STRICT
    item_id: ItemId
    ts: int = Field(0, ge=0, le=INT64_MAX, description="unix seconds of the interaction")


class UserInput(BaseModel):
    model_config = STRICT
    user_id: UserId | None = Field(None, description="look the history up in the store")
    history: list[HistoryItem] | None = Field(None, description="explicit history, oldest first (wins over user_id)")
    query_ts: int | None = Field(
        None, ge=0, le=INT64_MAX, description="time of the request (default: newest history time)"
    )
    budget_ms: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="latency budget for this request, counted from arrival"
    )


class RecommendRequest(UserInput):
    k: int = Field(10, ge=1, description="how many items to return")
    exclude_seen: bool = True
    num_candidates: int | None = Field(None, ge=1, description="how many FAISS candidates to rank")


class ScoredItem(BaseModel):
    item_id: int | str
    score: float
    title: str | None = None


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str
    degraded: bool
    degraded_reasons: list[str]
    candidates_recalled: int
    candidates_ranked: int
    timings_ms: dict[str, float]


class ScoreRequest(UserInput):
    item_ids: list[ItemId] = Field(..., min_length=1, description="items to score with the ranker")


class ScoreResponse(BaseModel):
    scores: list[ScoredItem]
    model_version: str
    degraded: bool
    degraded_reasons: list[str]
    timings_ms: dict[str, float]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: a message (or, for 422, a list of field errors), never a trace or an address."""

    detail: str | list[dict]


# --- the live data path (issue 10) -------------------------------------------------------------------------
class EventIn(BaseModel):
    model_config = STRICT
    user_id: UserId
    item_id: Annotated[Id, Field(description="a catalog item (or one added through /v1/items)")]
    ts: int = Field(..., ge=0, le=INT64_MAX, description="unix seconds; at most event_future_tolerance_s ahead")
    event_id: str | None = Field(
        None, min_length=1, max_length=128, description="idempotency key: an event_id seen before is skipped"
    )


class EventsRequest(BaseModel):
    model_config = STRICT
    events: list[EventIn] = Field(..., min_length=1, description="all written or none")


class EventsResponse(BaseModel):
    written: int
    duplicates: int
    users: int


MetaValue = str | int | float | bool | None


class ItemIn(BaseModel):
    model_config = STRICT
    item_id: Annotated[Id, Field(description="a new id (known ids are a 409)")]
    text: str = Field(..., min_length=1, description="what the build's text model embeds, e.g. 'Title (Year) | Genres'")
    metadata: dict[str, MetaValue] | None = Field(None, description="'title' is shown in results")


class ItemsRequest(BaseModel):
    model_config = STRICT
    items: list[ItemIn] = Field(..., min_length=1)


class ItemsResponse(BaseModel):
    accepted: list[int | str]
    status: str = Field(description="'queued': servable on every replica once the worker has embedded it")
