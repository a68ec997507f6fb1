"""The Redis store against real redis-server processes: loading, serving, a kill mid-run, reconnect."""

from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import pytest
import redis

from exporters.redis_loader import load_redis
from service.catalog import Catalog
from service.stores.base import VERSION_KEY, hist_key, unpack_history
from tests.conftest import REDIS_URL, RedisProcess, RunningServer, server_settings

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


def test_load_redis_is_versioned_and_idempotent(tiny_build, catalog):
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    out = load_redis(REDIS_URL, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    v = out["version"]
    assert r.get(VERSION_KEY).decode() == v
    assert not list(r.scan_iter(match="emb:*"))  # histories only: requests read no content embedding
    uid = next(iter(catalog.user_histories))
    items, ts = unpack_history(r.get(hist_key(v, uid)))
    assert items.tolist() == catalog.user_histories[uid][0][-len(items) :].tolist()
    n_keys = r.dbsize()
    r.set(f"emb:{v}:7", b"x")  # what a load or ingestion worker before 2026-12-07 wrote under the same version
    again = load_redis(REDIS_URL, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    assert again["version"] == v and r.dbsize() == n_keys  # idempotent, and the stale embedding key is gone
    assert again["deleted_embedding_keys"] == 1 and r.get(f"emb:{v}:7") is None


def test_version_flip_removes_old_version(tiny_build):
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    r.set(VERSION_KEY, "old")
    r.set("emb:old:1", b"x")  # what versions loaded before 2026-12-07 also wrote
    r.set(hist_key("old", 1), b"y")
    out = load_redis(REDIS_URL, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    assert out["previous"] == "old" and out["deleted_old_keys"] == 2
    assert r.get("emb:old:1") is None


def test_http_with_redis_store_matches_in_process(tiny_build, catalog, server):
    load_redis(REDIS_URL, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    srv = RunningServer(server_settings(tiny_build, redis_url=REDIS_URL, grpc_port=0))
    try:
        uid, other = list(catalog.user_histories)[:2]
        r = redis.Redis.from_url(REDIS_URL)
        with httpx.Client(timeout=30) as c:
            assert c.get(f"{srv.url}/readyz").json()["store"]["store"] == "redis"
            r.config_resetstat()
            a = c.post(f"{srv.url}/v1/recommend", json={"user_id": uid, "k": 10}).json()
            b = c.post(f"{server.url}/v1/recommend", json={"user_id": uid, "k": 10}).json()
            again = c.post(f"{srv.url}/v1/recommend", json={"user_id": uid, "k": 10}).json()
            fresh = c.post(f"{srv.url}/v1/recommend", json={"user_id": other, "k": 10})
            stats = r.info("commandstats")
        assert not a["degraded"] and fresh.status_code == 200 and not fresh.json()["degraded"]
        assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
        assert np.allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]], atol=1e-3)
        # The second request is served from the per-history caches, with the same answer.
        assert again["items"] == a["items"]
        # Redis was asked for histories only: the graphs take per-item tokens the build computed (ItemTokens), so
        # no request reads a content embedding (the MGET of every history item it used to send).
        assert stats["cmdstat_get"]["calls"] >= 2 and "cmdstat_mget" not in stats, stats
    finally:
        srv.stop()


def test_redis_killed_mid_run_then_reconnects(tiny_build, catalog):
    rp = RedisProcess()
    load_redis(rp.url, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    srv = RunningServer(server_settings(tiny_build, redis_url=rp.url, grpc_port=0, redis_retry_s=0.2))
    users = list(catalog.user_histories)[:20]
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for u in users[:10]:  # warm the local caches for these users
                assert c.post("/v1/recommend", json={"user_id": u}).status_code == 200
            rp.kill()
            codes, degraded = [], []
            for u in users:
                items, ts = catalog.user_histories[u]
                for body in (
                    {"user_id": u},
                    {"history": [{"item_id": int(i), "ts": int(t)} for i, t in zip(items, ts, strict=True)]},
                ):
                    r = c.post("/v1/recommend", json=body)  # the client's timeout: never hangs on the dead store
                    codes.append(r.status_code)
                    if r.status_code == 200:
                        degraded.append(r.json()["degraded"])
            # An outage is a 503 (retry) for users not in the local cache, never a 404 "unknown user".
            assert set(codes) <= {200, 503}, codes
            assert codes.count(200) >= 10 and any(degraded)  # cached users still answered, marked degraded
            ready = c.get("/readyz").json()
            assert ready["status"] == "degraded" and "unavailable" in ready["reasons"][0]

            rp.start()  # same port: the service must find it again
            load_redis(rp.url, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
            for _ in range(100):
                if c.get("/readyz").json()["status"] == "ok":
                    break
                time.sleep(0.1)
            r = c.post("/v1/recommend", json={"user_id": users[-1]})
            assert r.status_code == 200 and not r.json()["degraded"]
    finally:
        srv.stop()
        rp.kill()
