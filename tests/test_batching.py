"""Cross-request batching (service/pipeline/batching.py) and the per-history caches, on the tiny build's real
ONNX graphs: a request's scores do not depend on who shared its call, and an unchanged history recomputes
nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from service.backends.onnx import OnnxBackend
from service.catalog import Catalog
from service.contract import RANKER_CANDIDATES, RANKER_HISTORY, USER_TOWER, USER_TOWER_EXTEND, Manifest
from service.pipeline.batching import CandidateBatcher


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


@pytest.fixture(scope="module")
def backend(tiny_build):
    b = OnnxBackend(tiny_build.repo, Manifest.read(tiny_build.repo).dims, workers=2)
    yield b
    asyncio.run(b.close())


def _user(backend, dims, rng, n: int, qts: int) -> dict[str, np.ndarray]:
    """A user's ranker_candidates inputs (K/V from the real history pass) for a random history of length n
    (n <= max_len: the service keeps the last max_len events, and the history graph's tables are that long)."""
    hist = {
        "hist_token": rng.standard_normal((1, n, dims.d_model)).astype(np.float32),
        "hist_ts": np.sort(rng.integers(10**9, 10**9 + 10**7, size=(1, n))).astype(np.int64),
        "hist_valid": np.ones((1, n), np.float32),
        "query_ts": np.array([[qts]], np.int64),
    }
    kv = backend.run(RANKER_HISTORY, hist)
    return {**kv, **{k: hist[k] for k in ("hist_ts", "hist_valid", "query_ts")}}


def _alone(backend, user, tokens) -> np.ndarray:
    return backend.run(RANKER_CANDIDATES, {**user, "cand_token": tokens[None]})["scores"][0]


def test_batched_scores_equal_each_request_alone(backend, tiny_build):
    dims = Manifest.read(tiny_build.repo).dims
    rng = np.random.default_rng(0)
    # Different history lengths (left padding), candidate counts (right padding, a partial last row) and times.
    specs = [(3, 5), (dims.max_len - 3, 97), (17, 256), (dims.max_len, 300), (8, 1)]
    users = [_user(backend, dims, rng, n, 10**9 + 2 * 10**7 + 3600 * i) for i, (n, _) in enumerate(specs)]
    cands = [rng.standard_normal((m, dims.d_model)).astype(np.float32) for _, m in specs]
    alone = [_alone(backend, u, t) for u, t in zip(users, cands, strict=True)]

    calls: list[int] = []

    async def run(inputs):
        calls.append(inputs["cand_token"].shape[0])
        return await backend.infer(RANKER_CANDIDATES, inputs), None

    async def go():
        batcher = CandidateBatcher(run, microbatch=64, parallel=1, max_rows=64)
        try:
            return await asyncio.gather(*(batcher.score(u, t) for u, t in zip(users, cands, strict=True)))
        finally:
            await batcher.close()

    batched = asyncio.run(go())
    assert max(calls) > 1, calls  # requests really shared calls (else this test proves nothing)
    for (s, reason), ref, (_, m) in zip(batched, alone, specs, strict=True):
        assert reason is None and s.shape == (m,)
        np.testing.assert_allclose(s, ref, atol=1e-5, rtol=0)
    # and the users' scores differ from each other: a mix-up of rows would be caught
    assert not np.allclose(batched[1][0][:5], batched[0][0][:5], atol=1e-3)


def test_idle_request_splits_over_free_workers_and_failures_reach_every_request(backend, tiny_build):
    dims = Manifest.read(tiny_build.repo).dims
    rng = np.random.default_rng(1)
    user = _user(backend, dims, rng, 30, 10**9 + 2 * 10**7)
    tokens = rng.standard_normal((1000, dims.d_model)).astype(np.float32)
    sizes: list[int] = []

    async def run(inputs):
        sizes.append(inputs["cand_token"].shape[:2])
        return await backend.infer(RANKER_CANDIDATES, inputs), None

    async def fail(inputs):
        raise RuntimeError("backend exploded")

    async def go():
        b = CandidateBatcher(run, microbatch=256, parallel=2, max_rows=16)
        bad = CandidateBatcher(fail, microbatch=256, parallel=2, max_rows=16)
        try:
            scores, _ = await b.score(user, tokens)
            with pytest.raises(RuntimeError, match="exploded"):
                await asyncio.wait_for(asyncio.gather(bad.score(user, tokens), bad.score(user, tokens)), 10)
            return scores
        finally:
            await b.close()
            await bad.close()

    scores = asyncio.run(go())
    # 4 rows of 256 over the 2 free workers, not one call on one core; one user's rows side by side (B = 1)
    assert sorted(sizes) == [(1, 488), (1, 512)]  # 256 + 256, 256 + 232
    np.testing.assert_allclose(scores, _alone(backend, user, tokens), atol=1e-5, rtol=0)


def test_unchanged_history_runs_no_model_twice_and_an_event_recomputes(server, catalog):
    rec = server.components.recommender
    uid = next(u for u, (h, _) in catalog.user_histories.items() if len(h) >= 5)
    now = int(time.time())
    body = {"user_id": uid, "k": 10, "query_ts": now}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        first = c.post("/v1/recommend", json=body).json()
        uv_entries, kv_entries = len(rec.users.user_vec_cache), len(rec.users.kv_cache)
        hits = rec.users.user_vec_cache.hits
        again = c.post("/v1/recommend", json=body).json()
        assert again["items"] == first["items"]
        assert rec.users.user_vec_cache.hits == hits + 1  # the user tower did not run again
        # nor the history pass
        assert (len(rec.users.user_vec_cache), len(rec.users.kv_cache)) == (uv_entries, kv_entries)
        # Timings show the skipped stages cost (almost) nothing: the history's items looked up, the caches hit.
        assert "user_state" in again["timings_ms"]
        # A different history (the request's own, one item shorter) is a different key: computed afresh.
        items, ts = catalog.user_histories[uid]
        hist = [{"item_id": int(i), "ts": int(t)} for i, t in zip(items[:-1], ts[:-1], strict=True)]
        c.post("/v1/recommend", json={"history": hist, "k": 10, "query_ts": now})
        assert len(rec.users.user_vec_cache) == uv_entries + 1 and len(rec.users.kv_cache) == kv_entries + 1


@pytest.mark.parametrize("appended", [1, 2, 29])
def test_exported_user_tower_extension_equals_a_full_pass(backend, tiny_build, appended):
    """The served graphs: user_tower over the first P items, then user_tower_extend over the rest, give the
    user vector and keys/values of user_tower over all of them (tiny's max_len is 32: up to 29 appended)."""
    dims = Manifest.read(tiny_build.repo).dims
    rng = np.random.default_rng(appended)
    n = 31
    tok = rng.standard_normal((1, n, dims.tower_dim)).astype(np.float32)
    full = backend.run(USER_TOWER, {"hist_token": tok, "hist_valid": np.ones((1, n), np.float32)})
    p = n - appended
    past = backend.run(USER_TOWER, {"hist_token": tok[:, :p], "hist_valid": np.ones((1, p), np.float32)})
    ext = backend.run(USER_TOWER_EXTEND, {"past_k": past["user_k"], "past_v": past["user_v"], "new_token": tok[:, p:]})
    np.testing.assert_allclose(ext["user_vec"], full["user_vec"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate([past["user_k"], ext["new_k"]], 2), full["user_k"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.concatenate([past["user_v"], ext["new_v"]], 2), full["user_v"], atol=1e-5, rtol=0)


def test_grown_history_extends_the_users_tower_state_and_matches_a_full_pass(server, catalog):
    """A user whose history grew by events since their last request runs user_tower_extend over the new events
    only; the vector it serves equals a full pass over the grown history (caches cleared, another user id)."""
    rec = server.components.recommender
    uid = next(u for u, (h, _) in catalog.user_histories.items() if len(h) >= 16)
    items, ts = catalog.user_histories[uid]
    items, ts = items[-16:], ts[-16:]
    now = int(time.time())
    key = rec.users._tower_key(uid, rec.users.store_version())

    def post(c, user_id: int, n: int) -> None:
        hist = [{"item_id": int(i), "ts": int(t)} for i, t in zip(items[:n], ts[:n], strict=True)]
        r = c.post("/v1/recommend", json={"user_id": user_id, "history": hist, "k": 10, "query_ts": now})
        assert r.status_code == 200, r.text

    def tower_hits() -> float:
        return rec.metrics.cache_lookups.labels("tower_state", "hit")._value.get()

    with httpx.Client(base_url=server.url, timeout=30) as c:
        rec.users.tower_states.clear()
        post(c, uid, 10)
        assert len(rec.users.tower_states.get(key).hist_raw) == 10
        for n in (11, 13, 16):  # 1, 2, then 3 events appended
            hits = tower_hits()
            post(c, uid, n)
            state = rec.users.tower_states.get(key)
            assert tower_hits() == hits + 1 and len(state.hist_raw) == n and state.k.shape[2] == n
        extended = state
        # The same 16 items computed in one pass: no state, no cached vector for this history.
        rec.users.user_vec_cache.clear()
        rec.users.tower_states.clear()
        other = uid + 10**6
        post(c, other, 16)
        other_key = rec.users._tower_key(other, rec.users.store_version())
        fresh = rec.users.tower_states.get(other_key)
        np.testing.assert_allclose(extended.user_vec, fresh.user_vec, atol=1e-5, rtol=0)
        np.testing.assert_allclose(extended.k, fresh.k, atol=1e-5, rtol=0)
        # Histories that do not continue the stored one are recomputed in full and replace it: the oldest item
        # dropped (the window slid), or the same length with an earlier item changed.
        swapped = items.copy()
        swapped[3] = next(i for i in catalog.raw_ids.tolist() if i not in set(items.tolist()))
        for new_items in (items[1:], swapped):
            hits = tower_hits()
            hist = [{"item_id": int(i), "ts": int(t)} for i, t in zip(new_items, ts[-len(new_items) :], strict=True)]
            r = c.post("/v1/recommend", json={"user_id": other, "history": hist, "k": 10, "query_ts": now})
            assert r.status_code == 200 and tower_hits() == hits
            assert np.array_equal(rec.users.tower_states.get(other_key).hist_raw, new_items)


def test_inline_backend_runs_on_the_callers_thread_and_scores_the_same(backend, tiny_build):
    """inference_workers = 0 (one process per core): model calls run on the event loop's own thread, and batched
    requests still get the scores they get alone from the threaded backend."""
    dims = Manifest.read(tiny_build.repo).dims
    inline = OnnxBackend(tiny_build.repo, dims, workers=0)
    rng = np.random.default_rng(2)
    users = [_user(backend, dims, rng, n, 10**9 + 2 * 10**7 + 60 * n) for n in (5, dims.max_len - 1, dims.max_len)]
    cands = [rng.standard_normal((m, dims.d_model)).astype(np.float32) for m in (70, 129, 3)]
    alone = [_alone(backend, u, t) for u, t in zip(users, cands, strict=True)]
    threads: set[int] = set()
    run_once = inline.run

    def recording_run(model, inputs):
        threads.add(threading.get_ident())
        return run_once(model, inputs)

    inline.run = recording_run  # instrumentation only: the real ONNX Runtime call still runs

    async def go():
        async def run(inputs):
            return await inline.infer(RANKER_CANDIDATES, inputs), None

        batcher = CandidateBatcher(run, microbatch=64, parallel=1, max_rows=64)
        try:
            return threading.get_ident(), await asyncio.gather(
                *(batcher.score(u, t) for u, t in zip(users, cands, strict=True))
            )
        finally:
            await batcher.close()
            await inline.close()

    loop_thread, batched = asyncio.run(go())
    assert threads == {loop_thread}
    for (s, reason), ref in zip(batched, alone, strict=True):
        assert reason is None
        np.testing.assert_allclose(s, ref, atol=1e-5, rtol=0)


def test_backlog_counts_the_candidates_ahead_at_the_learned_cost(backend, tiny_build):
    """Issue 26: ranking plans from the batcher's own queue (rows waiting, half the rows running) at its learned
    cost per candidate, split over its workers: an average over all loads learned bursts only after they had
    made rankings time out (7 % of answers at 300 req/s)."""
    dims = Manifest.read(tiny_build.repo).dims
    rng = np.random.default_rng(3)
    user = _user(backend, dims, rng, 20, 10**9)
    tokens = rng.standard_normal((300, dims.d_model)).astype(np.float32)

    async def go() -> tuple[tuple[float, float], tuple[float, float], CandidateBatcher]:
        gate = asyncio.Event()

        async def run(inputs):
            await gate.wait()  # the call "runs" until released
            return {"scores": np.zeros(inputs["cand_token"].shape[:2], np.float32)}, None

        async def settle() -> None:
            for _ in range(10):
                await asyncio.sleep(0)

        b = CandidateBatcher(run, microbatch=100, parallel=1, max_rows=2)
        b.cand_cost_s = 1e-5
        idle = b.backlog()
        first = asyncio.ensure_future(b.score(user, tokens[:200]))  # two rows: one call, running
        await settle()
        second = asyncio.ensure_future(b.score(user, tokens))  # three rows, queued behind it
        await settle()
        busy = b.backlog()
        gate.set()
        await asyncio.gather(first, second)
        await b.close()
        return idle, busy, b

    idle, busy, b = asyncio.run(go())
    assert idle == (0.0, 1e-5)
    assert busy[1] == 1e-5 and busy[0] == pytest.approx((300 + 200 / 2) * 1e-5)
    assert b.calls == 3 and b.cand_cost_s != 1e-5  # each call's cost learned
    assert b.backlog() == (0.0, b.cand_cost_s)  # drained


def test_a_budget_that_runs_out_keeps_the_first_rows_ranked(backend, tiny_build):
    """A ranking cut short by its timer keeps the scores of its first rows when asked for partial results (the
    recommend path: the best-recalled candidates ranked, not all of them thrown away for recall order); rows
    never sent are dropped; without `partial`, or with no row ranked, it is a timeout as before."""
    dims = Manifest.read(tiny_build.repo).dims
    rng = np.random.default_rng(5)
    user = _user(backend, dims, rng, 20, 10**9)
    tokens = rng.standard_normal((300, dims.d_model)).astype(np.float32)

    async def go(partial: bool, first_ranks: bool) -> tuple[np.ndarray | None, list[int]]:
        sent: list[int] = []
        stuck = asyncio.Event()  # never set: the calls after the first never finish

        async def run(inputs):
            sent.append(inputs["cand_token"].shape[1])
            if len(sent) > 1 or not first_ranks:
                await stuck.wait()
            return {"scores": np.arange(inputs["cand_token"].shape[1], dtype=np.float32)[None]}, None

        b = CandidateBatcher(run, microbatch=100, parallel=1, max_rows=1)
        try:
            scores, _ = await b.score(user, tokens, timeout_s=0.5, partial=partial)
            return scores, sent
        except TimeoutError:
            return None, sent
        finally:
            await b.close()

    scores, sent = asyncio.run(go(partial=True, first_ranks=True))
    assert scores is not None and scores.tolist() == list(range(100))  # the first row's 100, not all 300
    assert sent == [100, 100]  # the third row never went out
    assert asyncio.run(go(partial=False, first_ranks=True))[0] is None
    assert asyncio.run(go(partial=True, first_ranks=False))[0] is None
