"""POST /v1/recommend and /v1/score: open, or behind a `read` key when require_read_key is set."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.api.deps import API_ERRORS, AUTH_ERRORS, ArrivalDep, HandlersDep, require, to_http
from service.api.handlers import Refused
from service.api.schemas import RecommendRequest, RecommendResponse, ScoreRequest, ScoreResponse
from service.auth import READ


def router(require_read_key: bool) -> APIRouter:
    r = APIRouter()
    errors = {**API_ERRORS, **AUTH_ERRORS} if require_read_key else API_ERRORS

    @r.post(
        "/v1/recommend",
        response_model=RecommendResponse,
        responses=errors,
        dependencies=[require(READ, "recommend")] if require_read_key else [],
    )
    async def recommend(
        body: RecommendRequest, h: HandlersDep, arrival: ArrivalDep, response: Response
    ) -> RecommendResponse:
        try:
            answer = await h.recommend(body, arrival, "http")
        except Refused as e:
            raise to_http(e, arrival) from e
        response.headers["Server-Timing"] = answer.timings.server_timing()
        return answer.body

    @r.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses=errors,
        dependencies=[require(READ, "score")] if require_read_key else [],
    )
    async def score(body: ScoreRequest, h: HandlersDep, arrival: ArrivalDep, response: Response) -> ScoreResponse:
        try:
            answer = await h.score(body, arrival, "http")
        except Refused as e:
            raise to_http(e, arrival) from e
        response.headers["Server-Timing"] = answer.timings.server_timing()
        return answer.body

    return r
