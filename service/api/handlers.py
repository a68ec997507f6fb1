"""What every request goes through, whichever transport brought it: validate, run, refuse, count, redact.

HTTP (service/api/routes/) and gRPC (service/api/grpc_server.py) only turn bytes into the request models and the results
back into bytes; everything else is here, once, so the two cannot drift: the same request gets the same answer,
the same degraded reasons (redacted), the same status and the same metrics over both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.api.errors import Refusal, refusal
from service.api.schemas import (
    EventsRequest,
    EventsResponse,
    ItemsRequest,
    ItemsResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    ScoreRequest,
    ScoreResponse,
)
from service.api.validation import (
    check_events,
    check_items,
    check_recommend,
    check_score,
    raw_item_ids,
    raw_user_input,
)
from service.auth import AuthError
from service.components import Components
from service.pipeline.deadline import StageTimer
from service.redact import redact


class Refused(Exception):
    """An expected failure, already counted: the transport answers `refusal` (HTTP status or gRPC code)."""

    def __init__(self, r: Refusal):
        super().__init__(r.message)
        self.refusal = r


@dataclass
class Answer:
    """A handler's result: the response model and the stage timings (HTTP sends them as Server-Timing)."""

    body: object
    timings: StageTimer | None = None


class Handlers:
    """One per process, over the components. `endpoint` names are the same for both transports."""

    def __init__(self, c: Components):
        self.c = c

    # --- refusing and counting --------------------------------------------------------------------------
    def refuse(self, e: BaseException, endpoint: str, transport: str) -> Refused:
        """The refusal for an expected failure, counted; a bug is re-raised (the transport answers 500/INTERNAL)."""
        r = refusal(e)
        if r is None:  # a bug: counted as 500 / INTERNAL; the transport logs it and answers without detail
            self.c.metrics.answers.labels(endpoint, transport, "500").inc()
            raise e
        if r.shed:
            self.c.metrics.shed.labels(endpoint).inc()
        self.c.metrics.answers.labels(endpoint, transport, str(r.http_status)).inc()
        return Refused(r)

    def _done(self, endpoint: str, transport: str, arrival: float, status: int = 200, degraded: bool = False) -> None:
        m = self.c.metrics
        m.answers.labels(endpoint, transport, str(status)).inc()
        m.request_latency.labels(endpoint).observe(time.perf_counter() - arrival)
        if degraded:
            m.degraded.labels(endpoint).inc()

    def authorize(self, authorization: str | None, scope: str, endpoint: str, transport: str) -> None:
        try:
            self.c.keys.check(authorization, scope)
        except AuthError as e:
            raise self.refuse(e, endpoint, transport) from None  # from None: no key text in any chained trace

    # --- the four endpoints -----------------------------------------------------------------------------
    async def recommend(self, body: RecommendRequest, arrival: float, transport: str) -> Answer:
        c = self.c
        try:
            deadline = check_recommend(body, c.settings, arrival)
            rec = c.recommender  # one version for the whole request, even if a swap happens meanwhile
            u = raw_user_input(body, rec.catalog)
            with rec.in_use():
                res = await rec.recommend(
                    u.user_id, u.history, body.k, body.exclude_seen, body.num_candidates, deadline, body.query_ts
                )
        except Exception as e:  # noqa: BLE001 - refuse() re-raises what it does not know
            raise self.refuse(e, "recommend", transport) from e
        c.metrics.stages(res.timings.stages)
        self._done("recommend", transport, arrival, degraded=bool(res.degraded))
        return Answer(
            RecommendResponse(
                items=[ScoredItem(**i) for i in res.items],
                model_version=rec.manifest.model_version,
                degraded=bool(res.degraded),
                degraded_reasons=[redact(r) for r in res.degraded],
                candidates_recalled=res.candidates_recalled,
                candidates_ranked=res.candidates_ranked,
                timings_ms={k: round(v, 3) for k, v in res.timings.stages.items()},
            ),
            res.timings,
        )

    async def score(self, body: ScoreRequest, arrival: float, transport: str, patient: bool = False) -> Answer:
        """`patient`: a batch user (gRPC ScoreBatch) queues for a slot as long as its caller waits."""
        c = self.c
        try:
            deadline = check_score(body, c.settings, arrival)
            rec = c.recommender  # one version for the whole request
            u = raw_user_input(body, rec.catalog)
            items = raw_item_ids(body, rec.catalog)
            with rec.in_use():
                scores, deg, tm = await rec.score(u.user_id, u.history, items, deadline, body.query_ts, patient=patient)
        except Exception as e:  # noqa: BLE001
            raise self.refuse(e, "score", transport) from e
        self._done("score", transport, arrival, degraded=bool(deg))
        return Answer(
            ScoreResponse(
                scores=[
                    ScoredItem(item_id=rec.catalog.item_key(i), score=float(v))
                    for i, v in zip(body.item_ids, scores, strict=True)
                ],
                model_version=rec.manifest.model_version,
                degraded=bool(deg),
                degraded_reasons=[redact(r) for r in deg],
                timings_ms={k: round(v, 3) for k, v in tm.stages.items()},
            ),
            tm,
        )

    async def record_events(self, body: EventsRequest, idempotency_key: str | None, transport: str) -> Answer:
        arrival = time.perf_counter()
        try:
            known = self.c.catalog.index_of.__contains__
            evs = check_events(body, self.c.settings, known, time.time(), idempotency_key, self.c.catalog)
            out = await self.c.live.record_events(evs)
        except Exception as e:  # noqa: BLE001
            raise self.refuse(e, "events", transport) from e
        self._done("events", transport, arrival)
        return Answer(EventsResponse(written=out.written, duplicates=out.duplicates, users=out.users))

    async def add_items(self, body: ItemsRequest, transport: str) -> Answer:
        arrival = time.perf_counter()
        try:
            items = check_items(body, self.c.settings, self.c.catalog)
            jobs = self.c.live.jobs(items, time.time())
            await self.c.live.submit(jobs)
        except Exception as e:  # noqa: BLE001
            raise self.refuse(e, "items", transport) from e
        self._done("items", transport, arrival, status=202)
        return Answer(ItemsResponse(accepted=[j.item_id if j.key is None else j.key for j in jobs], status="queued"))
