"""The live data path (issue 10) against real parts: uvicorn, gRPC, a redis-server of the test's own (loaded with
`load_redis`), the real ingestion worker (the build's text model) as a child process of the API.

Events: they change the next recommendation and are excluded as seen, a batch with one bad entry writes nothing,
event_ids deduplicate, and the ranker's K/V cache never serves the history from before an event. New items: the
worker embeds the text with the build's model (an exact copy of an item's text gets that item's embedding), and a
near-copy of a popular item's text reaches the top 10 of a user whose history leads up to that item, on a second
replica that shares the Redis. In-process (no Redis) supports both too.
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
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg
from service.stores.base import VERSION_KEY, Event, hist_key, merge_history, unpack_history
from service.stores.redis import RedisStore
from tests.conftest import RedisProcess, RunningServer, free_port, server_settings

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

SECRET = "live-path-write-key-0123456789"
AUTH = {"authorization": f"Bearer {SECRET}"}
KEYS = [f"write:{SECRET}"]
POLL_S = 60.0  # "within 5 s" on a quiet machine; CI is a busy 2-core box, so: poll, never assert a time bound


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


@pytest.fixture(scope="module")
def data(tiny_build):
    return np.load(tiny_build.paths.data)


@pytest.fixture(scope="module")
def redis_proc(tiny_build):
    rp = RedisProcess()
    load_redis(rp.url, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    yield rp
    rp.kill()


@pytest.fixture(scope="module")
def local(tiny_build):
    """The in-process default: no Redis; the worker is spawned by the API on the first POST /v1/items."""
    s = RunningServer(server_settings(tiny_build, api_keys=KEYS, max_event_batch=50))
    yield s
    _stop_and_check_worker(s)


@pytest.fixture(scope="module")
def replicas(tiny_build, redis_proc):
    """Two replicas sharing one Redis: A starts the ingestion worker, B runs none (it only tails the item log)."""
    common = dict(api_keys=KEYS, redis_url=redis_proc.url, max_event_batch=50, redis_retry_s=0.2)
    a = RunningServer(server_settings(tiny_build, ingest_worker="start", **common))
    b = RunningServer(server_settings(tiny_build, ingest_worker="off", grpc_port=0, **common))
    yield a, b
    b.stop()
    _stop_and_check_worker(a)


def _stop_and_check_worker(s: RunningServer) -> None:
    proc = s.components.live.feed.proc
    s.stop()
    if proc is not None:  # the worker the API started is gone with it
        assert proc.returncode is not None


@pytest.fixture(params=["in-process", "redis"])
def srv(request, local, replicas):
    return local if request.param == "in-process" else replicas[0]


def _rec(c: httpx.Client, body: dict) -> list[int]:
    r = c.post("/v1/recommend", json={"k": 10, **body})
    assert r.status_code == 200, r.text
    return [i["item_id"] for i in r.json()["items"]]


def _history(stored: tuple[np.ndarray, np.ndarray]) -> list[dict]:
    items, ts = stored
    return [{"item_id": int(i), "ts": int(t)} for i, t in zip(items, ts, strict=True)]


def _fresh_user(catalog, k: int) -> int:
    return list(catalog.user_histories)[k]


def _foreign_items(catalog, uid: int, n: int) -> list[int]:
    """Items of another user's taste (the longest history with nothing in common with uid's)."""
    mine = set(catalog.user_histories[uid][0].tolist())
    for other, (items, _) in sorted(catalog.user_histories.items(), key=lambda kv: -len(kv[1][0])):
        cand = [int(i) for i in dict.fromkeys(items.tolist()) if i not in mine]
        if other != uid and len(cand) >= n:
            return cand[-n:]
    raise AssertionError("no foreign items")


# --- events --------------------------------------------------------------------------------------------------
def test_redis_script_merges_like_merge_history(redis_proc):
    """The Lua append and the in-process merge are one semantics: time order, stable, capped, deduplicated."""
    import asyncio

    async def run() -> None:
        r = redis.Redis.from_url(redis_proc.url)
        version = r.get(VERSION_KEY).decode()
        store = RedisStore(redis_proc.url, 1.0)
        await store.start()
        rng = np.random.default_rng(0)
        uid = 10**9
        items, ts = np.array([5, 6, 7]), np.array([100, 200, 200])
        r.set(hist_key(version, uid), np.concatenate([items, ts]).astype("<i8").tobytes())
        evs = [
            Event(uid, int(i), int(t), f"e{j % 5}")
            for j, (i, t) in enumerate(zip(rng.integers(1, 50, 12), np.sort(rng.integers(50, 300, 12)), strict=True))
        ]
        out = await store.append_events(evs, 8, 100)
        fresh = {}
        for e in evs:
            fresh.setdefault(e.event_id, e)
        kept = sorted(fresh.values(), key=lambda e: e.ts)
        want = merge_history(items, ts, np.array([e.item_id for e in kept]), np.array([e.ts for e in kept]), 8)
        got = unpack_history(r.get(hist_key(version, uid)))
        assert out.written == 5 and out.duplicates == 7
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
        again = await store.append_events(evs[:3], 8, 100)
        assert again.written == 0 and again.duplicates == 3
        await store.close()

    asyncio.run(run())


def test_events_change_the_next_recommendation_and_are_excluded_as_seen(srv, catalog):
    uid = _fresh_user(catalog, 3)
    foreign = _foreign_items(catalog, uid, 12)
    now = int(time.time())
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        before = _rec(c, {"user_id": uid})
        stored = catalog.user_histories[uid]
        events = [{"user_id": uid, "item_id": i, "ts": now - 600 + 10 * j} for j, i in enumerate(foreign)]
        r = c.post("/v1/events", json={"events": events}, headers=AUTH)
        assert r.status_code == 200 and r.json() == {"written": 12, "duplicates": 0, "users": 1}, r.text
        after = _rec(c, {"user_id": uid})
        # The next request ranks with the events: exactly what the same history sent explicitly gives.
        explicit = _history(stored) + [{"item_id": e["item_id"], "ts": e["ts"]} for e in events]
        assert after == _rec(c, {"history": explicit})
        assert after != before
        assert not set(after) & set(foreign)  # seen now: excluded
        with_seen = _rec(c, {"user_id": uid, "exclude_seen": False, "k": 50})
        assert set(with_seen) & set(foreign)  # without the filter they are what the user is into


def test_a_batch_with_one_bad_entry_writes_nothing(srv, catalog):
    uid = _fresh_user(catalog, 5)
    items = catalog.raw_ids[:5].tolist()
    now = int(time.time())
    good = [{"user_id": uid, "item_id": int(i), "ts": now - 100 + j} for j, i in enumerate(items)]
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        before = c.post("/v1/score", json={"user_id": uid, "item_ids": items, "query_ts": now}).json()["scores"]
        bad_item = [*good, {"user_id": uid + 1, "item_id": 10**15, "ts": now}]
        bad_ts = [*good[:2], {"user_id": uid, "item_id": int(items[0]), "ts": now + 3600}, *good[2:]]
        too_many = good * 11  # 55 > max_event_batch (50)
        for body, loc in ((bad_item, ["body", "events", 5, "item_id"]), (bad_ts, ["body", "events", 2, "ts"])):
            r = c.post("/v1/events", json={"events": body}, headers=AUTH)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc, r.text
        r = c.post("/v1/events", json={"events": too_many}, headers=AUTH)
        assert r.status_code == 422 and "limit is 50" in r.text
        after = c.post("/v1/score", json={"user_id": uid, "item_ids": items, "query_ts": now}).json()["scores"]
    assert after == before  # nothing was appended


def test_event_ids_deduplicate(srv, catalog):
    uid = _fresh_user(catalog, 7)
    now = int(time.time())
    evs = [
        {"user_id": uid, "item_id": int(catalog.raw_ids[j]), "ts": now - 50 + j, "event_id": f"dedup-{j}"}
        for j in range(4)
    ]
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v1/events", json={"events": evs}, headers=AUTH).json()["written"] == 4
        once = _rec(c, {"user_id": uid, "exclude_seen": False, "query_ts": now})
        r = c.post("/v1/events", json={"events": [*evs, {**evs[0], "event_id": "dedup-new"}]}, headers=AUTH)
        assert r.json() == {"written": 1, "duplicates": 4, "users": 1}
        # The retried events did not land twice: only the one new event changed the history.
        explicit = _history(catalog.user_histories[uid]) + [{"item_id": e["item_id"], "ts": e["ts"]} for e in evs]
        explicit.append({"item_id": evs[0]["item_id"], "ts": evs[0]["ts"]})
        explicit.sort(key=lambda h: h["ts"])
        twice = _rec(c, {"user_id": uid, "exclude_seen": False, "query_ts": now})
        assert twice == _rec(c, {"history": explicit, "exclude_seen": False, "query_ts": now})
        assert once != twice or len(explicit) > 32  # (a capped history may hide the change; it is not capped here)


def test_kv_cache_never_serves_a_history_from_before_an_event(srv, catalog):
    uid = _fresh_user(catalog, 9)
    items = catalog.raw_ids[:20].tolist()
    now = int(time.time())
    rec = srv.components.recommender
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        body = {"user_id": uid, "item_ids": items, "query_ts": now}
        first = c.post("/v1/score", json=body).json()["scores"]
        hits = len(rec.users.kv_cache)
        assert c.post("/v1/score", json=body).json()["scores"] == first  # served from the K/V cache
        assert len(rec.users.kv_cache) == hits
        ev = {"user_id": uid, "item_id": int(catalog.raw_ids[100]), "ts": now - 1}
        assert c.post("/v1/events", json={"events": [ev]}, headers=AUTH).status_code == 200
        after = c.post("/v1/score", json=body).json()["scores"]
        explicit = _history(catalog.user_histories[uid]) + [{"item_id": ev["item_id"], "ts": ev["ts"]}]
        fresh = c.post("/v1/score", json={"history": explicit, "item_ids": items, "query_ts": now}).json()["scores"]
    assert [s["score"] for s in after] != [s["score"] for s in first]
    assert np.allclose([s["score"] for s in after], [s["score"] for s in fresh], atol=1e-5)


# --- new items ------------------------------------------------------------------------------------------------
def _wait_servable(c: httpx.Client, item_id: int) -> None:
    # /v1/score answers 422 (unknown item) until the item is in this replica's catalog, store and FAISS index.
    end = time.time() + POLL_S
    while (
        c.post(
            "/v1/score", json={"user_id": 0, "history": [{"item_id": item_id, "ts": 1}], "item_ids": [item_id]}
        ).status_code
        != 200
    ):
        assert time.time() < end, f"item {item_id} not servable within {POLL_S} s"
        time.sleep(0.05)


def _popular_with_history(c: httpx.Client, catalog, data) -> tuple[int, list[dict]]:
    """The most popular item P and, among the windows that led real users to P, the one whose history makes the
    served models rank P highest: a user whose history is full of P's neighbours."""
    items, lengths = data["items"], data["lengths"]
    p = int(np.bincount(items).argmax())  # item index
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    windows = []
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        s = items[a:b]
        windows += [s[max(0, j - 20) : j] for j in range(1, len(s)) if s[j] == p and p not in s[max(0, j - 20) : j]]
    now = int(time.time())
    best, best_rank = None, 10**9
    for w in windows[:25]:
        hist = [{"item_id": int(catalog.raw_ids[i - 1]), "ts": now - 3600 * (len(w) - j)} for j, i in enumerate(w)]
        top = _rec(c, {"history": hist, "k": 50, "num_candidates": 400})
        pid = int(catalog.raw_ids[p - 1])
        rank = top.index(pid) if pid in top else 10**9
        if rank < best_rank:
            best, best_rank = hist, rank
    assert best is not None and best_rank < 5, best_rank
    return p, best


def test_near_copy_of_a_popular_item_reaches_top10_on_a_second_replica(replicas, catalog, data):
    a, b = replicas
    texts = data["item_texts"]
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        p, hist = _popular_with_history(cb, catalog, data)
        text = str(texts[p - 1])
        first = text.split(" ")[0]
        near = text.replace(first, first + "s", 1)  # "Love Ghost 206 (2016) | Comedy" -> "Loves Ghost ..."
        new_id = 7_000_001
        r = ca.post("/v1/items", json={"items": [{"item_id": new_id, "text": near}]}, headers=AUTH)
        assert r.status_code == 202 and r.json()["accepted"] == [new_id], r.text
        end = time.time() + POLL_S
        while True:  # on B, which never saw the POST and runs no worker
            top = _rec(cb, {"history": hist, "num_candidates": 400})
            if new_id in top:
                break
            assert time.time() < end, f"new item not in B's top 10 within {POLL_S} s: {top}"
            time.sleep(0.05)
        assert cb.get("/readyz").json()["live"]["live_items"] >= 1
        # Titles come from the text; events may now use the item on either replica.
        hit = next(
            i for i in cb.post("/v1/recommend", json={"history": hist}).json()["items"] if i["item_id"] == new_id
        )
        assert hit["title"] == near.split(" | ")[0]
        _wait_servable(ca, new_id)
        ev = {"events": [{"user_id": 1, "item_id": new_id, "ts": int(time.time())}]}
        assert cb.post("/v1/events", json=ev, headers=AUTH).status_code == 200
        # A replica started now replays the item log before it takes traffic: it serves the item at once.
        c = RunningServer(b.settings.model_copy(update={"port": free_port(), "grpc_port": 0}))
        try:
            with httpx.Client(base_url=c.url, timeout=30) as cc:
                assert new_id in _rec(cc, {"history": hist, "num_candidates": 400})
        finally:
            c.stop()


def test_new_item_in_process_uses_the_builds_text_model(local, catalog, data, tiny_build):
    texts = data["item_texts"]
    emb = np.load(tiny_build.paths.content_emb).astype(np.float32)
    x = 17  # item index whose exact text we send under a new id
    new_id = 8_000_017
    with httpx.Client(base_url=local.url, timeout=30) as c:
        r = c.post(
            "/v1/items",
            json={"items": [{"item_id": new_id, "text": str(texts[x - 1]), "metadata": {"title": "A copy"}}]},
            headers=AUTH,
        )
        assert r.status_code == 202, r.text
        again = c.post("/v1/items", json={"items": [{"item_id": new_id, "text": "other"}]}, headers=AUTH)
        assert again.status_code == 409  # pending or added: ids are immutable
        known = c.post("/v1/items", json={"items": [{"item_id": int(catalog.raw_ids[0]), "text": "t"}]}, headers=AUTH)
        assert known.status_code == 409 and "items.0.item_id" in known.text
        _wait_servable(c, new_id)
        row = local.components.live.applied[new_id].emb.astype(np.float32)  # what its tokens were computed from
        # The same model and pooling as the build: the copy's embedding is the original's (float16 rounding).
        assert np.allclose(row, emb[x - 1], atol=2e-3), np.abs(row - emb[x - 1]).max()
        r = c.post(
            "/v1/recommend",
            json={
                "history": [{"item_id": int(catalog.raw_ids[x - 1]), "ts": 1}],
                "k": 200,
                "exclude_seen": False,
                "num_candidates": 500,
            },
        )
        titles = {i["item_id"]: i["title"] for i in r.json()["items"]}
        assert titles.get(new_id) == "A copy"  # recalled and ranked from the content embedding alone


def test_near_copy_reaches_top10_in_process(local, catalog, data):
    texts = data["item_texts"]
    with httpx.Client(base_url=local.url, timeout=30) as c:
        p, hist = _popular_with_history(c, catalog, data)
        text = str(texts[p - 1])
        near = text.replace(text.split(" ")[0], text.split(" ")[0] + "s", 1)
        new_id = 8_000_001
        assert c.post("/v1/items", json={"items": [{"item_id": new_id, "text": near}]}, headers=AUTH).status_code == 202
        end = time.time() + POLL_S
        while new_id not in (top := _rec(c, {"history": hist, "num_candidates": 400})):
            assert time.time() < end, top
            time.sleep(0.05)


def test_grpc_add_items(local):
    new_id = 8_000_100
    with grpc.insecure_channel(f"127.0.0.1:{local.settings.grpc_port}") as ch:
        stub = pbg.RecommenderStub(ch)
        meta = (("authorization", f"Bearer {SECRET}"),)
        out = stub.AddItems(
            pb.AddItemsRequest(items=[pb.NewItem(item_id=new_id, text="Sea Ghost 1 (1999) | Drama")]),
            timeout=30,
            metadata=meta,
        )
        assert list(out.accepted) == [new_id] and out.status == "queued"
        with pytest.raises(grpc.RpcError) as e:
            stub.AddItems(
                pb.AddItemsRequest(items=[pb.NewItem(item_id=new_id, text="again")]), timeout=30, metadata=meta
            )
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:
            stub.AddItems(
                pb.AddItemsRequest(items=[pb.NewItem(item_id=new_id + 1, text=" ")]), timeout=30, metadata=meta
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with httpx.Client(base_url=local.url, timeout=30) as c:
        _wait_servable(c, new_id)


def test_api_process_never_imports_torch():
    """The LLM lives in the worker process: the API's modules (and the feed that spawns the worker) import no
    torch or transformers."""
    import subprocess
    import sys

    code = (
        "import sys, service.api.app, service.api.grpc_server, service.ingest.feed, service.ingest.live\n"
        "import falconrec.cli\n"
        "bad = [m for m in ('torch', 'transformers', 'training', 'training.ingest_worker') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ingest_latency_measurement_runs(replicas, data):
    """loadtest/ingest.py, the POST -> recommendable measurement, on a few items (POST to A, watch B)."""
    from loadtest.ingest import measure_ingest, variants

    a, b = replicas
    texts = data["item_texts"].tolist()
    rep = measure_ingest(a.url, b.url, SECRET, variants(texts, 3, "m"), 9_000_000, variants(texts[3:], 5, "mb"))
    assert rep.n == 3 and rep.burst_n == 5 and rep.p50_ms > 0 and rep.items_per_s > 0
    assert "items/s" in rep.markdown()
