"""gRPC: Recommend and ScoreBatch (streamed per user) on the same Recommender as HTTP, plus the standard
health service and reflection."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.deadline import Deadline
from service.inference import BackendUnavailable
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg
from service.recommender import BadRequest, Overloaded, UnknownUser

log = logging.getLogger("falconrec.grpc")
MAX_BATCH_USERS = 10_000
SCORE_CONCURRENCY = 8  # users of one batch scored at once


class RecommenderServicer(pbg.RecommenderServicer):
    def __init__(self, components):
        self.c = components

    def _deadline(self, budget_ms: float) -> Deadline:
        s = self.c.settings
        return Deadline.ms(min(budget_ms or s.budget_ms, s.max_budget_ms))

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext):
        s = self.c.settings
        k = request.k or 10
        if k > s.max_k:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k={k} is over the limit of {s.max_k}")
        if len(request.history) > s.max_history:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"history has {len(request.history)} items; the limit is {s.max_history}",
            )
        history = [(h.item_id, h.ts) for h in request.history] or None
        user_id = request.user_id if request.HasField("user_id") else None
        if user_id is None and history is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a user_id or a history")
        try:
            res = await self.c.recommender.recommend(
                user_id,
                history,
                k,
                request.exclude_seen if request.HasField("exclude_seen") else True,
                request.num_candidates or None,
                self._deadline(request.budget_ms),
                request.query_ts if request.HasField("query_ts") else None,
            )
        except UnknownUser as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except BadRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.field}: {e}")
        except Overloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except (TimeoutError, BackendUnavailable) as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"models unavailable ({type(e).__name__}), retry shortly")
        return pb.RecommendResponse(
            items=[pb.ScoredItem(item_id=i["item_id"], score=i["score"], title=i["title"]) for i in res.items],
            model_version=self.c.manifest.model_version,
            degraded=bool(res.degraded),
            degraded_reasons=res.degraded,
            timings_ms=res.timings.stages,
            candidates_recalled=res.candidates_recalled,
            candidates_ranked=res.candidates_ranked,
        )

    async def _score_one(self, u: pb.ScoreUser, budget_ms: float) -> pb.UserScores:
        s = self.c.settings
        if not u.item_ids or len(u.item_ids) > s.max_score_items:
            return pb.UserScores(
                request_id=u.request_id,
                error_code="INVALID_ARGUMENT",
                error=f"item_ids must hold 1..{s.max_score_items} ids, got {len(u.item_ids)}",
            )
        try:
            scores, deg, _ = await self.c.recommender.score(
                u.user_id if u.HasField("user_id") else None,
                [(h.item_id, h.ts) for h in u.history] or None,
                list(u.item_ids),
                self._deadline(budget_ms),
                u.query_ts if u.HasField("query_ts") else None,
            )
        except UnknownUser as e:
            return pb.UserScores(request_id=u.request_id, error=str(e), error_code="NOT_FOUND")
        except BadRequest as e:
            return pb.UserScores(request_id=u.request_id, error=f"{e.field}: {e}", error_code="INVALID_ARGUMENT")
        except Overloaded as e:
            return pb.UserScores(request_id=u.request_id, error=str(e), error_code="RESOURCE_EXHAUSTED")
        except (TimeoutError, BackendUnavailable):
            return pb.UserScores(
                request_id=u.request_id, error="not scored within the budget", error_code="UNAVAILABLE"
            )
        return pb.UserScores(request_id=u.request_id, scores=scores.tolist(), degraded=bool(deg))

    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext):
        if len(request.users) > MAX_BATCH_USERS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.users)} users in one batch; the limit is {MAX_BATCH_USERS}",
            )
        # Bounded fan-out; results stream back in completion order (request_id says whose).
        sem = asyncio.Semaphore(SCORE_CONCURRENCY)

        async def one(u):
            async with sem:
                return await self._score_one(u, request.budget_ms)

        for fut in asyncio.as_completed([one(u) for u in request.users]):
            yield await fut


async def start_grpc(components, host: str, port: int) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    pbg.add_RecommenderServicer_to_server(RecommenderServicer(components), server)
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
    log.info("gRPC on %s:%d", host, bound)
    return server
