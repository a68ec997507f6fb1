"""HTTP request/response bodies. Static bounds live here; limits from settings are checked in the routes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: int = Field(..., ge=0, description="catalog item id")
    ts: int = Field(0, ge=0, description="unix seconds of the interaction")


class UserInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: int | None = Field(None, ge=0, description="look the history up in the store")
    history: list[HistoryItem] | None = Field(None, description="explicit history, oldest first (wins over user_id)")
    query_ts: int | None = Field(None, ge=0, description="time of the request (default: newest history time)")
    budget_ms: float | None = Field(None, gt=0, description="latency budget for this request")


class RecommendRequest(UserInput):
    k: int = Field(10, ge=1, description="how many items to return")
    exclude_seen: bool = True
    num_candidates: int | None = Field(None, ge=1, description="how many FAISS candidates to rank")


class ScoredItem(BaseModel):
    item_id: int
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
    item_ids: list[int] = Field(..., min_length=1, description="items to score with the ranker")


class ScoreResponse(BaseModel):
    scores: list[ScoredItem]
    model_version: str
    degraded: bool
    degraded_reasons: list[str]
    timings_ms: dict[str, float]
