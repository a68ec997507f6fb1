"""HTTP and gRPC are adapters over one handler layer (service/api/handlers.py): the same request gets the same
answer, the same degraded reasons, the same status and the same metrics over both (issue 23)."""

from __future__ import annotations

import re

import grpc
import httpx
import pytest

from service.catalog import Catalog
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield pbg.RecommenderStub(ch)


@pytest.fixture(scope="module")
def user(tiny_build) -> int:
    return next(iter(Catalog.load(tiny_build.paths.data).user_histories))


def answers(server, endpoint: str, transport: str, status: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = rf'falconrec_answers_total{{endpoint="{endpoint}",status="{status}",transport="{transport}"}} (\S+)'
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def test_a_degraded_request_says_the_same_over_both(server, stub, user):
    # At the minimum budget (0.1 ms) the budget is spent before ranking, every time: recall order, degraded.
    before = {t: answers(server, "recommend", t, "200") for t in ("http", "grpc")}
    r = httpx.post(f"{server.url}/v1/recommend", json={"user_id": user, "k": 5, "budget_ms": 0.1}, timeout=10)
    assert r.status_code == 200, r.text
    g = stub.Recommend(pb.RecommendRequest(user_id=user, k=5, budget_ms=0.1), timeout=10)
    http = r.json()
    assert http["degraded"] and g.degraded
    assert http["degraded_reasons"] == list(g.degraded_reasons) == ["budget: ranking skipped, recall order"]
    assert [i["item_id"] for i in http["items"]] == [i.item_id for i in g.items]
    for t in ("http", "grpc"):
        assert answers(server, "recommend", t, "200") == before[t] + 1


@pytest.mark.parametrize(
    "body, proto",
    [
        ({"user_id": 987_654_321}, pb.RecommendRequest(user_id=987_654_321)),  # unknown user
        (
            {"history": [{"item_id": 10**12, "ts": 1}]},
            pb.RecommendRequest(history=[pb.HistoryEvent(item_id=10**12, ts=1)]),
        ),
        ({"user_id": 1, "k": 100_000}, pb.RecommendRequest(user_id=1, k=100_000)),  # over max_k
    ],
)
def test_a_refused_request_gets_the_same_status_and_count_over_both(server, stub, body, proto):
    r = httpx.post(f"{server.url}/v1/recommend", json=body, timeout=10)
    status = str(r.status_code)
    assert status in ("404", "422"), r.text
    before = {t: answers(server, "recommend", t, status) for t in ("http", "grpc")}
    httpx.post(f"{server.url}/v1/recommend", json=body, timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        stub.Recommend(proto, timeout=10)
    code = {"404": grpc.StatusCode.NOT_FOUND, "422": grpc.StatusCode.INVALID_ARGUMENT}[status]
    assert e.value.code() == code
    for t in ("http", "grpc"):
        assert answers(server, "recommend", t, status) == before[t] + 1, t
