"""Issue 9, point 4, over a real gRPC channel: the same validation as HTTP, INVALID_ARGUMENT for garbage, a
message size cap, and ScoreBatch that queues fairly and stops when its client is gone."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from service.catalog import Catalog
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg
from tests.conftest import RunningServer, server_settings


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


def _cases(item: int) -> list[tuple[str, pb.RecommendRequest, dict]]:
    """(name, gRPC request, the same request over HTTP)"""
    return [
        ("negative budget", pb.RecommendRequest(user_id=1, budget_ms=-5), {"user_id": 1, "budget_ms": -5}),
        ("NaN budget", pb.RecommendRequest(user_id=1, budget_ms=float("nan")), None),
        ("infinite budget", pb.RecommendRequest(user_id=1, budget_ms=float("inf")), None),
        ("tiny budget", pb.RecommendRequest(user_id=1, budget_ms=1e-30), {"user_id": 1, "budget_ms": 1e-30}),
        ("negative user", pb.RecommendRequest(user_id=-1), {"user_id": -1}),
        (
            "negative ts",
            pb.RecommendRequest(history=[pb.HistoryEvent(item_id=item, ts=-1)]),
            {"history": [{"item_id": item, "ts": -1}]},
        ),
        (
            "negative item",
            pb.RecommendRequest(history=[pb.HistoryEvent(item_id=-3, ts=1)]),
            {"history": [{"item_id": -3, "ts": 1}]},
        ),
        ("negative query_ts", pb.RecommendRequest(user_id=1, query_ts=-1), {"user_id": 1, "query_ts": -1}),
        ("k over the limit", pb.RecommendRequest(user_id=1, k=1000), {"user_id": 1, "k": 1000}),
        ("nothing", pb.RecommendRequest(), {}),
    ]


def test_grpc_refuses_what_http_refuses(channel, server, catalog):
    item = int(catalog.raw_ids[0])
    stub = pbg.RecommenderStub(channel)
    for name, req, body in _cases(item):
        with pytest.raises(grpc.RpcError) as e:
            stub.Recommend(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.value.details())
        if body is not None:
            r = httpx.post(f"{server.url}/v1/recommend", json=body, timeout=10)
            assert r.status_code == 422, (name, r.text)


def test_score_batch_validates_each_user_and_the_batch(channel, catalog):
    item = int(catalog.raw_ids[0])
    uid = next(iter(catalog.user_histories))
    stub = pbg.RecommenderStub(channel)
    req = pb.ScoreBatchRequest(
        users=[
            pb.ScoreUser(request_id="ok", user_id=uid, item_ids=[item]),
            pb.ScoreUser(request_id="neg-ts", history=[pb.HistoryEvent(item_id=item, ts=-5)], item_ids=[item]),
            pb.ScoreUser(request_id="neg-item", user_id=uid, item_ids=[-1]),
            pb.ScoreUser(request_id="none", user_id=uid),
        ]
    )
    out = {r.request_id: r for r in stub.ScoreBatch(req, timeout=30)}
    assert out["ok"].scores and not out["ok"].error
    for rid in ("neg-ts", "neg-item", "none"):
        assert out[rid].error_code == "INVALID_ARGUMENT", out[rid]
    for budget in (-1.0, float("nan"), 1e9):
        with pytest.raises(grpc.RpcError) as e:
            list(stub.ScoreBatch(pb.ScoreBatchRequest(users=req.users[:1], budget_ms=budget), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("method", ["Recommend", "ScoreBatch"])
def test_garbage_payload_is_invalid_argument(channel, method):
    call = (channel.unary_unary if method == "Recommend" else channel.unary_stream)(
        f"/falconrec.v1.Recommender/{method}", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as e:
        result = call(b"\xff\xff\xff\xff\x0fgarbage", timeout=10)
        if method == "ScoreBatch":
            list(result)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "<class" not in e.value.details() and "Error" not in e.value.details()


def test_message_over_the_cap_is_refused(channel, server, catalog):
    cap = server.settings.max_grpc_message_bytes
    item = int(catalog.raw_ids[0])
    users = [pb.ScoreUser(request_id=str(i), user_id=1, item_ids=[item] * 1000) for i in range(cap // 1000 + 10)]
    req = pb.ScoreBatchRequest(users=users)
    assert req.ByteSize() > cap
    with pytest.raises(grpc.RpcError) as e:
        list(pbg.RecommenderStub(channel).ScoreBatch(req, timeout=30))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _metric(url: str, prefix: str) -> float:
    """Sum of the /metrics samples whose line starts with `prefix`."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _kv_lookups(url: str) -> float:
    return _metric(url, 'falconrec_cache_lookups_total{cache="kv"')


def _batch_workers(url: str) -> float:
    return _metric(url, "falconrec_score_batch_workers ")


def test_score_batch_queues_instead_of_failing_and_stops_when_cancelled(tiny_build, catalog):
    """A batch wider than the pipeline slots used to fail most of its users (RESOURCE_EXHAUSTED/UNAVAILABLE)
    and to go on scoring for ~20 s after its client gave up."""
    srv = RunningServer(server_settings(tiny_build, max_active=2, budget_ms=20.0))
    users = list(catalog.user_histories)
    items = catalog.raw_ids[: min(400, len(catalog.raw_ids))].tolist()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as ch:
            stub = pbg.RecommenderStub(ch)
            batch = [pb.ScoreUser(request_id=str(i), user_id=users[i % len(users)], item_ids=items) for i in range(200)]
            out = list(stub.ScoreBatch(pb.ScoreBatchRequest(users=batch, budget_ms=20), timeout=120))
            codes = [r.error_code for r in out]
            assert len(out) == 200 and "RESOURCE_EXHAUSTED" not in codes
            # Scoring inside its own budget can still time out on a busy machine; waiting for a slot never fails.
            assert codes.count("") >= 190, {c: codes.count(c) for c in set(codes)}

            big = [pb.ScoreUser(request_id=str(i), user_id=users[i % len(users)], item_ids=items) for i in range(5000)]
            with pytest.raises(grpc.RpcError) as e:
                for _ in stub.ScoreBatch(pb.ScoreBatchRequest(users=big, budget_ms=20), timeout=0.5):
                    pass
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server notices the cancellation: its batch workers end (bounded wait, not a timing assertion; the
        # old check, no request waiting and no slot held, also held between two users of the departed batch).
        for _ in range(600):
            if _batch_workers(srv.url) == 0:
                break
            time.sleep(0.05)
        assert _batch_workers(srv.url) == 0
        settled = _kv_lookups(srv.url)
        time.sleep(1.0)
        assert _kv_lookups(srv.url) == settled  # nothing scored for the departed client
        # and HTTP is served at once
        r = httpx.post(f"{srv.url}/v1/recommend", json={"user_id": users[0], "budget_ms": 1000}, timeout=30)
        assert r.status_code == 200
    finally:
        srv.stop()
