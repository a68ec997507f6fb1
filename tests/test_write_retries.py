"""Issue 22, points 3 and 5: a write answered 503 is retried as the answer says, and lands once.

With Redis frozen (SIGSTOP) a write times out and is answered 503, but the command is already in Redis's input
buffer and runs when Redis resumes: the answer used to say "nothing was written" / "items not queued", and the
retry it asked for appended every event twice (and queued the item twice, or answered 409). Against a redis-server
of the test's own, the real uvicorn and gRPC servers and the real ingestion worker.
"""

from __future__ import annotations

import shutil
import time

import grpc
import httpx
import numpy as np
import pytest
import redis

from exporters.redis_loader import load_redis
from service.catalog import Catalog
from service.ingest.feed import JOBS_STREAM, log_key
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg
from service.stores.base import VERSION_KEY, hist_key, unpack_history
from tests.conftest import RedisProcess, RunningServer, server_settings

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

SECRET = "write-retries-key-0123456789"
AUTH = {"authorization": f"Bearer {SECRET}"}
WAIT_S = 120.0  # generous bound for what the server owes (never a timing assertion)


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


@pytest.fixture(scope="module")
def redis_proc(tiny_build):
    rp = RedisProcess()
    load_redis(rp.url, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    yield rp
    rp.cont()
    rp.kill()


@pytest.fixture(scope="module")
def srv(tiny_build, redis_proc):
    s = RunningServer(
        server_settings(
            tiny_build, redis_url=redis_proc.url, api_keys=[f"write:{SECRET}"], redis_retry_s=0.2, ingest_worker="start"
        )
    )
    yield s
    s.stop()


@pytest.fixture
def client(srv):
    with httpx.Client(base_url=srv.url, timeout=WAIT_S) as c:
        yield c


def _ready(c: httpx.Client) -> None:
    end = time.time() + WAIT_S
    while c.get("/readyz").json()["status"] != "ok":
        assert time.time() < end, "the store did not come back"
        time.sleep(0.1)


def _frozen(redis_proc: RedisProcess, c: httpx.Client, path: str, body: dict, headers: dict) -> httpx.Response:
    """One POST while Redis is frozen; Redis resumes whatever happens."""
    _ready(c)
    redis_proc.stop()
    try:
        return c.post(path, json=body, headers=headers)
    finally:
        redis_proc.cont()


def _stored(redis_proc: RedisProcess, uid: int) -> list[tuple[int, int]]:
    r = redis.Redis.from_url(redis_proc.url)
    version = r.get(VERSION_KEY).decode()
    items, ts = unpack_history(r.get(hist_key(version, uid)))
    return list(zip(items.tolist(), ts.tolist(), strict=True))


def _events(catalog, uid: int, n: int, t0: int) -> list[dict]:
    return [{"user_id": uid, "item_id": int(catalog.raw_ids[10 + j]), "ts": t0 + j} for j in range(n)]


def test_events_answered_503_in_a_freeze_and_retried_with_the_key_are_written_once(redis_proc, client, catalog):
    uid = list(catalog.user_histories)[11]
    events = _events(catalog, uid, 5, int(time.time()) - 100)  # no event_id: the case that doubled
    headers = {**AUTH, "Idempotency-Key": "freeze-retry-0001"}
    r = _frozen(redis_proc, client, "/v1/events", {"events": events}, headers)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "may have been written" in r.json()["detail"] and "same Idempotency-Key" in r.json()["detail"]
    _ready(client)
    retry = client.post("/v1/events", json={"events": events}, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.json()["written"] + retry.json()["duplicates"] == 5
    again = client.post("/v1/events", json={"events": events}, headers=headers)
    assert again.json() == {"written": 0, "duplicates": 5, "users": 1}
    stored = _stored(redis_proc, uid)
    assert [stored.count((e["item_id"], e["ts"])) for e in events] == [1] * 5, stored[-10:]


def test_a_key_reused_for_another_batch_drops_nothing(client, redis_proc, catalog):
    uid = list(catalog.user_histories)[12]
    first = _events(catalog, uid, 3, int(time.time()) - 200)
    other = _events(catalog, uid, 3, int(time.time()) - 150)  # same indices, other times
    headers = {**AUTH, "Idempotency-Key": "reused-key"}
    assert client.post("/v1/events", json={"events": first}, headers=headers).json()["written"] == 3
    assert client.post("/v1/events", json={"events": other}, headers=headers).json()["written"] == 3
    bad = client.post("/v1/events", json={"events": first}, headers={**AUTH, "Idempotency-Key": "has space"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "idempotency-key"], bad.text


def test_grpc_record_events_takes_the_key_as_metadata(srv, catalog):
    uid = list(catalog.user_histories)[13]
    events = [pb.Event(**e) for e in _events(catalog, uid, 4, int(time.time()) - 300)]
    meta = (("authorization", f"Bearer {SECRET}"), ("idempotency-key", "grpc-retry-0001"))
    with grpc.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as ch:
        stub = pbg.RecommenderStub(ch)
        first = stub.RecordEvents(pb.RecordEventsRequest(events=events), metadata=meta, timeout=30)
        retry = stub.RecordEvents(pb.RecordEventsRequest(events=events), metadata=meta, timeout=30)
        assert (first.written, retry.written, retry.duplicates) == (4, 0, 4)
        with pytest.raises(grpc.RpcError) as e:
            stub.RecordEvents(pb.RecordEventsRequest(events=events), metadata=(meta[0], ("idempotency-key", "")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Idempotency-Key" in e.value.details()


def _wait_servable(c: httpx.Client, item_id: int) -> None:
    body = {"history": [{"item_id": item_id, "ts": 1}], "item_ids": [item_id]}
    end = time.time() + WAIT_S
    while c.post("/v1/score", json=body).status_code != 200:
        assert time.time() < end, f"item {item_id} not servable"
        time.sleep(0.05)


def _logged(redis_proc: RedisProcess, item_id: int) -> int:
    r = redis.Redis.from_url(redis_proc.url)
    version = r.get(VERSION_KEY).decode()
    return sum(int(f[b"item_id"]) == item_id for _, f in r.xrange(log_key(version)))


def _queued(redis_proc: RedisProcess, item_id: int) -> int:
    r = redis.Redis.from_url(redis_proc.url)
    return sum(int(f[b"item_id"]) == item_id for _, f in r.xrange(JOBS_STREAM))


def test_items_answered_503_in_a_freeze_and_retried_are_queued_once(redis_proc, client):
    item = {"item_id": 5_500_001, "text": "Frozen Ghost 2 (2003) | Horror"}
    r = _frozen(redis_proc, client, "/v1/items", {"items": [item]}, AUTH)
    assert r.status_code == 503 and "may have been queued" in r.json()["detail"], r.text
    _ready(client)
    retry = client.post("/v1/items", json={"items": [item]}, headers=AUTH)
    assert retry.status_code == 202 and retry.json()["accepted"] == [item["item_id"]], retry.text
    _wait_servable(client, item["item_id"])
    again = client.post("/v1/items", json={"items": [item]}, headers=AUTH)
    assert again.status_code == 202, again.text  # the same job once more: accepted, not queued
    other = client.post("/v1/items", json={"items": [{**item, "text": "Another text"}]}, headers=AUTH)
    assert other.status_code == 409, other.text  # ids stay immutable
    # A second job would be in the log or still in the stream (the worker moves one from the stream to the log in
    # one transaction): neither.
    assert _logged(redis_proc, item["item_id"]) == 1 and _queued(redis_proc, item["item_id"]) == 0


def test_a_repeated_item_post_is_accepted_in_process(tiny_build):
    """Without Redis too: the same job again is a retry (202), not a 409, and the item is added once."""
    s = RunningServer(server_settings(tiny_build, grpc_port=0, api_keys=[f"write:{SECRET}"]))
    item = {"item_id": 5_500_002, "text": "Twice Told 3 (2004) | Drama"}
    try:
        with httpx.Client(base_url=s.url, timeout=WAIT_S) as c:
            codes = [c.post("/v1/items", json={"items": [item]}, headers=AUTH).status_code for _ in range(2)]
            _wait_servable(c, item["item_id"])
            codes.append(c.post("/v1/items", json={"items": [item]}, headers=AUTH).status_code)
            assert codes == [202, 202, 202]
            assert c.get("/readyz").json()["live"]["live_items"] == 1
            catalog = s.components.recommender.catalog
            assert int(np.sum(catalog.raw_ids == item["item_id"])) == 1
    finally:
        s.stop()
