"""gRPC: Recommend and ScoreBatch (streamed per user) on the same Recommender as HTTP, plus the standard
health service and reflection.

Requests are decoded here (not by grpc's generated deserializer: a payload that is not the message answered
UNKNOWN with a Python class name), converted into the HTTP request models and checked by the same
service.api.validation, and failures are answered through the same service.api.errors mapping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.handlers import Handlers, Refused
from service.api.schemas import EventsRequest, ItemsRequest, RecommendRequest, ScoreRequest
from service.api.validation import (
    IDEMPOTENCY_HEADER,
    InvalidInput,
    check_score,
    parse,
)
from service.auth import READ, WRITE
from service.proto import recommender_pb2 as pb
from service.redact import for_log

log = logging.getLogger("falconrec.grpc")
SERVICE = "falconrec.v1.Recommender"
MAX_BATCH_USERS = 10_000


def _history(events: Any) -> list[dict] | None:
    return [{"item_id": h.item_key or h.item_id, "ts": h.ts} for h in events] or None


def _user(r: Any) -> int | str | None:
    """The user's id: user_key when set (a string-id catalog), else user_id when set, else none."""
    if r.HasField("user_key"):
        return r.user_key
    return r.user_id if r.HasField("user_id") else None


def scored_item(item_id: int | str, score: float, title: str | None = None) -> pb.ScoredItem:
    if isinstance(item_id, str):
        return pb.ScoredItem(item_key=item_id, score=score, title=title or "")
    return pb.ScoredItem(item_id=item_id, score=score, title=title or "")


def recommend_input(r: pb.RecommendRequest) -> dict:
    """The proto as the HTTP body would say it (0 = default for k, num_candidates and budget_ms)."""
    return {
        "user_id": _user(r),
        "history": _history(r.history),
        "k": r.k or 10,
        "exclude_seen": r.exclude_seen if r.HasField("exclude_seen") else True,
        "num_candidates": r.num_candidates or None,
        "budget_ms": r.budget_ms or None,  # NaN is truthy: it reaches validation and is refused there
        "query_ts": r.query_ts if r.HasField("query_ts") else None,
    }


def score_input(u: pb.ScoreUser, budget_ms: float) -> dict:
    return {
        "user_id": _user(u),
        "history": _history(u.history),
        "item_ids": list(u.item_keys) or list(u.item_ids),
        "budget_ms": budget_ms or None,
        "query_ts": u.query_ts if u.HasField("query_ts") else None,
    }


def events_input(r: pb.RecordEventsRequest) -> dict:
    return {
        "events": [
            {
                "user_id": e.user_key or e.user_id,
                "item_id": e.item_key or e.item_id,
                "ts": e.ts,
                "event_id": e.event_id if e.HasField("event_id") else None,
            }
            for e in r.events
        ]
    }


def items_input(r: pb.AddItemsRequest) -> dict:
    return {
        "items": [
            {"item_id": it.item_key or it.item_id, "text": it.text, "metadata": dict(it.metadata) or None}
            for it in r.items
        ]
    }


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """A text metadata value (keys arrive lower-case), or None."""
    value = next((v for k, v in context.invocation_metadata() or () if k == key), None)
    return value if isinstance(value, str) else None


def _decode(cls: type[Message], raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError:
        return None


class RecommenderServicer:
    """The gRPC adapter: protos in and out; validation, the pipeline, refusals, metrics and redaction are the
    handlers' (service.api.handlers), the same as over HTTP."""

    def __init__(self, components, handlers: Handlers):
        self.c = components
        self.h = handlers

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.c.metrics.grpc_responses.labels(method, code.name).inc()

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, msg: str):
        self._count(method, code)
        await context.abort(code, msg)

    def _refused(self, e: BaseException, method: str, endpoint: str) -> tuple[grpc.StatusCode, str]:
        """(code, details) of a failure: a handler's refusal, or one decided here for what failed before it."""
        try:
            refused = e if isinstance(e, Refused) else self.h.refuse(e, endpoint, "grpc")
        except Exception:  # noqa: BLE001 - a bug: logged here, answered without detail
            log.error("unhandled error in %s: %s", method, for_log(e), exc_info=e)
            return grpc.StatusCode.INTERNAL, "internal error"
        return grpc.StatusCode[refused.refusal.grpc_code], refused.refusal.grpc_details

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str, endpoint: str, scope: str) -> None:
        """The HTTP keys, from `authorization` metadata. The key is never logged or echoed."""
        try:
            self.h.authorize(_metadata(context, "authorization"), scope, endpoint, "grpc")
        except Refused as e:
            await self._abort(context, method, *self._refused(e, method, endpoint))

    async def Recommend(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.RecommendResponse:
        start = time.perf_counter()
        await self._authorize(context, "Recommend", "recommend", READ)
        request = _decode(pb.RecommendRequest, raw)
        if request is None:
            await self._abort(context, "Recommend", grpc.StatusCode.INVALID_ARGUMENT, "not a RecommendRequest message")
        try:
            answer = await self.h.recommend(parse(RecommendRequest, recommend_input(request)), start, "grpc")
        except Exception as e:  # noqa: BLE001 - every failure gets a status; bugs are logged, not shown
            await self._abort(context, "Recommend", *self._refused(e, "Recommend", "recommend"))
        self._count("Recommend", grpc.StatusCode.OK)
        res = answer.body
        return pb.RecommendResponse(
            items=[scored_item(i.item_id, i.score, i.title) for i in res.items],
            model_version=res.model_version,
            degraded=res.degraded,
            degraded_reasons=res.degraded_reasons,
            timings_ms=res.timings_ms,
            candidates_recalled=res.candidates_recalled,
            candidates_ranked=res.candidates_ranked,
        )

    async def _score_one(self, u: pb.ScoreUser, budget_ms: float) -> pb.UserScores:
        try:
            body: ScoreRequest = parse(ScoreRequest, score_input(u, budget_ms))
            # patient: a batch user waits its turn for a slot (FIFO with HTTP) and its budget starts there
            answer = await self.h.score(body, time.perf_counter(), "grpc", patient=True)
        except Exception as e:  # noqa: BLE001 - one user's failure is that user's result
            code, details = self._refused(e, "ScoreBatch", "score")
            return pb.UserScores(request_id=u.request_id, error=details, error_code=code.name)
        res = answer.body
        return pb.UserScores(request_id=u.request_id, scores=[s.score for s in res.scores], degraded=res.degraded)

    async def ScoreBatch(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.UserScores]:
        await self._authorize(context, "ScoreBatch", "score", READ)
        request = _decode(pb.ScoreBatchRequest, raw)
        if request is None:
            await self._abort(context, "ScoreBatch", grpc.StatusCode.INVALID_ARGUMENT, "not a ScoreBatchRequest")
        if len(request.users) > MAX_BATCH_USERS:
            await self._abort(
                context,
                "ScoreBatch",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.users)} users in one batch; the limit is {MAX_BATCH_USERS}",
            )
        budget = request.budget_ms
        try:  # the batch's budget is every user's: refuse a bad one (negative, NaN, over the cap) once
            probe = parse(ScoreRequest, {"user_id": 0, "item_ids": [0], "budget_ms": budget or None})
            check_score(probe, self.c.settings, 0.0)
        except InvalidInput as e:
            await self._abort(context, "ScoreBatch", grpc.StatusCode.INVALID_ARGUMENT, f"{e.field}: {e}")

        # A few workers (score_batch_concurrency) pull users in order: a batch never holds more pipeline slots
        # than that, and never fails users for lack of one (it fanned out 8 wide over 2 slots: 94% failed).
        users = iter(request.users)
        done: asyncio.Queue[pb.UserScores] = asyncio.Queue()

        async def worker() -> None:
            self.c.metrics.score_batch_workers.inc()
            try:
                for u in users:
                    await done.put(await self._score_one(u, budget))
            finally:
                self.c.metrics.score_batch_workers.dec()

        workers = [asyncio.ensure_future(worker()) for _ in range(self.c.settings.score_batch_concurrency)]
        try:
            for _ in range(len(request.users)):
                yield await done.get()  # completion order; request_id says whose
            self._count("ScoreBatch", grpc.StatusCode.OK)
        finally:
            # The client is gone (cancelled, deadline) or we are done: stop scoring for nobody. Without this the
            # batch kept scoring ~20 s after its client's DEADLINE_EXCEEDED, starving HTTP.
            for w in workers:
                w.cancel()

    async def RecordEvents(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.RecordEventsResponse:
        await self._authorize(context, "RecordEvents", "events", WRITE)
        request = _decode(pb.RecordEventsRequest, raw)
        if request is None:
            await self._abort(context, "RecordEvents", grpc.StatusCode.INVALID_ARGUMENT, "not a RecordEventsRequest")
        try:
            body: EventsRequest = parse(EventsRequest, events_input(request))
            answer = await self.h.record_events(body, _metadata(context, IDEMPOTENCY_HEADER), "grpc")
        except Exception as e:  # noqa: BLE001 - every failure gets a status; bugs are logged, not shown
            await self._abort(context, "RecordEvents", *self._refused(e, "RecordEvents", "events"))
        self._count("RecordEvents", grpc.StatusCode.OK)
        out = answer.body
        return pb.RecordEventsResponse(written=out.written, duplicates=out.duplicates, users=out.users)

    async def AddItems(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.AddItemsResponse:
        await self._authorize(context, "AddItems", "items", WRITE)
        request = _decode(pb.AddItemsRequest, raw)
        if request is None:
            await self._abort(context, "AddItems", grpc.StatusCode.INVALID_ARGUMENT, "not an AddItemsRequest")
        try:
            answer = await self.h.add_items(parse(ItemsRequest, items_input(request)), "grpc")
        except Exception as e:  # noqa: BLE001 - every failure gets a status; bugs are logged, not shown
            await self._abort(context, "AddItems", *self._refused(e, "AddItems", "items"))
        self._count("AddItems", grpc.StatusCode.OK)
        accepted = answer.body.accepted
        return pb.AddItemsResponse(
            accepted=[a for a in accepted if isinstance(a, int)],
            accepted_keys=[a for a in accepted if isinstance(a, str)],
            status=answer.body.status,
        )


def _handlers(servicer: RecommenderServicer) -> grpc.GenericRpcHandler:
    # request_deserializer=None: the handler gets the bytes and decodes them itself (see the module doc).
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Recommend": grpc.unary_unary_rpc_method_handler(
                servicer.Recommend, response_serializer=pb.RecommendResponse.SerializeToString
            ),
            "ScoreBatch": grpc.unary_stream_rpc_method_handler(
                servicer.ScoreBatch, response_serializer=pb.UserScores.SerializeToString
            ),
            "RecordEvents": grpc.unary_unary_rpc_method_handler(
                servicer.RecordEvents, response_serializer=pb.RecordEventsResponse.SerializeToString
            ),
            "AddItems": grpc.unary_unary_rpc_method_handler(
                servicer.AddItems, response_serializer=pb.AddItemsResponse.SerializeToString
            ),
        },
    )


async def start_grpc(components, handlers: Handlers, host: str, port: int) -> grpc.aio.Server:
    cap = components.settings.max_grpc_message_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", cap), ("grpc.max_send_message_length", cap)])
    server.add_generic_rpc_handlers((_handlers(RecommenderServicer(components, handlers)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["Recommender"].full_name, reflection.SERVICE_NAME, health.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"could not bind gRPC to {host}:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(names[0], health_pb2.HealthCheckResponse.SERVING)
    components.grpc_port = bound
    log.info("gRPC on port %d", bound)
    return server
