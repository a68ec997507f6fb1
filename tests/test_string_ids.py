"""Issue 24: the catalog's own ids, strings included, in every request and answer over HTTP and gRPC.

The served catalog here is the tiny build with its ids rewritten as strings ("sku-12", "user-7") and their raw ids
as service/ids.py derives them: what a build from files with string ids writes (tests/test_dataset_files.py builds
one from files end to end). Events, new items (through the real ingestion worker) and both transports are exercised
against a real server, with Redis and without.
"""

from __future__ import annotations

import shutil
import time

import grpc
import httpx
import numpy as np
import pytest

from exporters.redis_loader import load_redis
from service.ids import hash_key, keys_to_raw
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pb_grpc
from tests.conftest import RedisProcess, RunningServer, TinyBuild, server_settings

SECRET = "string-ids-key-0123456789"
AUTH = {"authorization": f"Bearer {SECRET}"}
WAIT_S = 180.0


def _as_strings(src: TinyBuild, dst: TinyBuild) -> None:
    """Copy a tiny build's artifacts with every id a string: items "sku-<raw>", users "user-<raw>"."""
    shutil.copytree(src.artifacts, dst.artifacts)
    path = dst.artifacts / "tiny" / "data.npz"
    z = dict(np.load(path, allow_pickle=False))
    z["item_keys"] = np.array([f"sku-{r}" for r in z["item_raw_ids"].tolist()])
    z["user_keys"] = np.array([f"user-{u}" for u in z["user_raw_ids"].tolist()])
    z["item_raw_ids"], z["user_raw_ids"] = keys_to_raw(z["item_keys"]), keys_to_raw(z["user_keys"])
    z["id_kinds"] = np.array(["str", "str"])  # [item kind, user kind], as a files build with string ids writes them
    np.savez_compressed(path, **z)


@pytest.fixture(scope="module")
def string_build(tiny_build, tmp_path_factory) -> TinyBuild:
    root = tmp_path_factory.mktemp("strids")
    tb = TinyBuild(root)
    tb.repo = tiny_build.repo  # the models are the same: only the ids around them change
    _as_strings(tiny_build, tb)
    return tb


@pytest.fixture(scope="module", params=["in-process", "redis"])
def served(request, string_build):
    rp = None
    extra: dict = {}
    if request.param == "redis":
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server not installed")
        rp = RedisProcess()
        load_redis(rp.url, "tiny", string_build.artifacts, string_build.repo, progress=False)
        extra = {"redis_url": rp.url, "redis_retry_s": 0.2}
    from service.catalog import Catalog

    catalog = Catalog.load(string_build.artifacts / "tiny" / "data.npz")
    srv = RunningServer(server_settings(string_build, api_keys=[f"write:{SECRET}"], **extra))
    yield srv, catalog
    srv.stop()
    if rp is not None:
        rp.kill()


def _a_user(catalog) -> tuple[str, list[str]]:
    raw = next(iter(catalog.user_histories))
    items = catalog.external(catalog.to_index(catalog.user_histories[raw][0]))
    user = next(k for k in (f"user-{u}" for u in range(1, 10_000)) if hash_key(k) == raw)
    return user, items


def test_recommend_and_score_speak_the_catalogs_string_ids(served):
    srv, catalog = served
    user, seen = _a_user(catalog)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/recommend", json={"user_id": user, "k": 5})
        assert r.status_code == 200, r.text
        got = [i["item_id"] for i in r.json()["items"]]
        assert len(got) == 5 and all(isinstance(i, str) and i.startswith("sku-") for i in got)
        assert not set(got) & set(seen)  # exclude_seen works on the string catalog's items
        by_history = c.post("/v1/recommend", json={"history": [{"item_id": i, "ts": 1} for i in seen], "k": 5})
        assert [i["item_id"] for i in by_history.json()["items"]] == got  # the same history, stored or sent
        scored = c.post("/v1/score", json={"user_id": user, "item_ids": got[:3]})
        assert scored.status_code == 200, scored.text
        assert [s["item_id"] for s in scored.json()["scores"]] == got[:3]
        # An unknown string id names its field; an integer is this catalog's id "<n>": unknown here, not a crash.
        bad = c.post("/v1/score", json={"user_id": user, "item_ids": ["sku-none"]})
        assert bad.status_code == 422 and "unknown item" in bad.text
        assert c.post("/v1/recommend", json={"user_id": 12}).status_code == 404
        too_long = c.post("/v1/recommend", json={"user_id": "u" * 129})
        assert too_long.status_code == 422


def test_grpc_recommend_with_string_ids(served):
    srv, catalog = served
    user, _ = _a_user(catalog)
    with grpc.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as ch:
        stub = pb_grpc.RecommenderStub(ch)
        res = stub.Recommend(pb.RecommendRequest(user_key=user, k=5), timeout=30)
        http = httpx.post(f"{srv.url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=30).json()
    assert [i.item_key for i in res.items] == [i["item_id"] for i in http["items"]]
    assert all(i.item_id == 0 for i in res.items)


def test_events_and_new_items_with_string_ids(served):
    srv, catalog = served
    user, seen = _a_user(catalog)
    new_user = f"brand-new-user-{time.time_ns()}"
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        ev = {"events": [{"user_id": new_user, "item_id": seen[0], "ts": 1_700_000_000}]}
        r = c.post("/v1/events", json=ev, headers=AUTH)
        assert r.status_code == 200, r.text
        rec = c.post("/v1/recommend", json={"user_id": new_user, "k": 3})
        assert rec.status_code == 200, rec.text  # a user the build never saw, known by its events
        unknown = {"events": [{"user_id": new_user, "item_id": "sku-nope", "ts": 1}]}
        r = c.post("/v1/events", json=unknown, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "events", 0, "item_id"]
        sku = f"new-sku-{time.time_ns()}"
        r = c.post("/v1/items", json={"items": [{"item_id": sku, "text": "Ghost Road (1999) | Horror"}]}, headers=AUTH)
        assert r.status_code == 202 and r.json()["accepted"] == [sku], r.text
        body = {"history": [{"item_id": sku, "ts": 1}], "item_ids": [sku]}
        end = time.time() + WAIT_S
        while (s := c.post("/v1/score", json=body)).status_code != 200:
            assert time.time() < end, s.text
            time.sleep(0.2)
        assert s.json()["scores"][0]["item_id"] == sku
        again = c.post("/v1/items", json={"items": [{"item_id": sku, "text": "Other (2000) | Drama"}]}, headers=AUTH)
        assert again.status_code == 409 and sku in again.text


def test_an_integer_catalog_refuses_string_ids(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/recommend", json={"user_id": "user-1"})
        assert r.status_code == 422 and "integers" in r.text
        r = c.post("/v1/score", json={"history": [{"item_id": "x", "ts": 1}], "item_ids": [1]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "history", 0, "item_id"]
