"""gRPC over a real channel: Recommend, ScoreBatch (streamed), health, reflection, stubs up to date."""

from __future__ import annotations

import filecmp

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.catalog import Catalog
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.settings.grpc_port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


def test_recommend_matches_http(channel, server, catalog):
    import httpx

    uid = next(iter(catalog.user_histories))
    r = pbg.RecommenderStub(channel).Recommend(pb.RecommendRequest(user_id=uid, k=6), timeout=10)
    h = httpx.post(f"{server.url}/v1/recommend", json={"user_id": uid, "k": 6}).json()
    assert [i.item_id for i in r.items] == [i["item_id"] for i in h["items"]]
    assert r.model_version == h["model_version"] and "ranking" in r.timings_ms


def test_recommend_errors_map_to_status_codes(channel):
    stub = pbg.RecommenderStub(channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Recommend(pb.RecommendRequest(user_id=10**9), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        stub.Recommend(pb.RecommendRequest(user_id=1, k=1000), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Recommend(pb.RecommendRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_score_batch_streams_one_result_per_user(channel, catalog):
    users = list(catalog.user_histories)[:30]
    items = catalog.raw_ids[:300].tolist()
    req = pb.ScoreBatchRequest(users=[pb.ScoreUser(request_id=f"u{u}", user_id=u, item_ids=items) for u in users])
    req.users.append(pb.ScoreUser(request_id="ghost", user_id=10**9, item_ids=[items[0]]))
    req.users.append(pb.ScoreUser(request_id="bad-item", user_id=users[0], item_ids=[123456789]))
    out = {r.request_id: r for r in pbg.RecommenderStub(channel).ScoreBatch(req, timeout=60)}
    assert len(out) == len(users) + 2
    assert out["ghost"].error_code == "NOT_FOUND" and out["bad-item"].error_code == "INVALID_ARGUMENT"
    for u in users:
        assert len(out[f"u{u}"].scores) == 300 and not out[f"u{u}"].error
    # batch invariance over gRPC: the same candidate alone
    alone = list(
        pbg.RecommenderStub(channel).ScoreBatch(
            pb.ScoreBatchRequest(users=[pb.ScoreUser(request_id="x", user_id=users[3], item_ids=[items[211]])]),
            timeout=10,
        )
    )
    assert abs(alone[0].scores[0] - out[f"u{users[3]}"].scores[211]) <= 1e-5
    assert np.isfinite(out[f"u{users[0]}"].scores).all()


def test_health_and_reflection(channel):
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "falconrec.v1.Recommender" in names and "grpc.health.v1.Health" in names


def test_checked_in_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from service.proto.generate import ROOT, generate

    for fresh in generate(tmp_path):
        checked_in = ROOT / "service" / "proto" / fresh.name
        assert filecmp.cmp(fresh, checked_in, shallow=False), f"{checked_in} is stale: python -m service.proto.generate"
