"""The online pipeline (no torch): history -> content embeddings -> user tower -> FAISS recall ->
HSTU ranking with M-FALCON (history K/V once per user, cached; candidates in microbatches) -> top K.

Every stage reads the request's Deadline. When time runs short, ranking covers fewer candidates or is
skipped (recall order), and the result says `degraded` with the reasons.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import BackendUnavailable, InferenceBackend
from service.catalog import Catalog
from service.contract import RANKER_CANDIDATES, RANKER_HISTORY, USER_TOWER, USER_TOWER_EXTEND, Manifest, time_buckets
from service.errors import BadRequest, Overloaded, Unavailable, UnknownUser
from service.lru import LRU
from service.metrics import Metrics
from service.pipeline.batching import CandidateBatcher
from service.pipeline.deadline import Deadline, StageTimer
from service.pipeline.item_tokens import ItemTokens
from service.pipeline.retrieval import Retriever
from service.settings import Settings
from service.stores.base import Embeddings, FeatureStore, StoreUnavailable

log = logging.getLogger("falconrec.pipeline")
REQUIRED_STAGE_FLOOR_S = 0.2
RESPONSE_RESERVE_S = 0.0015  # top K, the response body and its serialisation, after ranking
RANK_COST_MARGIN = 1.25


def _retrieve(task: asyncio.Future) -> None:
    """Mark a background task's exception as seen (it is handled, or the result was not needed)."""
    if not task.cancelled():
        task.exception()


def query_time(query_ts: int | None, deadline: Deadline) -> int:
    """The time candidates are scored at: the request's, else its arrival (unix seconds). Not the newest
    history time: that put every candidate at dt = 0 from the last event, a time the model never trains on."""
    if query_ts is not None:
        return int(query_ts)
    return int(time.time() - deadline.elapsed())


@dataclass
class History:
    items: np.ndarray  # raw ids, oldest first, at most max_len
    ts: np.ndarray
    user_id: int | None


@dataclass
class UserState:
    """Everything ranking needs about the user, computed once per request (or taken from the cache)."""

    hist_raw: np.ndarray  # [L] raw item ids (live-added items share model index 0: the raw id tells them apart)
    hist_idx: np.ndarray  # [1, L] model indices
    hist_emb: np.ndarray | None  # [1, L, E]; None until fetched (both caches hit: never)
    hist_ts: np.ndarray  # [1, L]
    hist_valid: np.ndarray  # [1, L]
    kv: dict[str, np.ndarray] | None = None  # hist_k, hist_v, hist_q
    user_vec: np.ndarray | None = None  # [1, T]
    # The store's data version, read before the embeddings were fetched: the caches key by it, so an entry
    # computed across a version flip lands under the old version, where nobody looks again.
    store_version: object = None


@dataclass(frozen=True)
class TowerState:
    """What the user tower computed for one user's history: enough to continue it by appended events."""

    hist_raw: np.ndarray  # [P] raw item ids it was computed from
    user_vec: np.ndarray  # [1, T]
    k: np.ndarray  # [1, layers, P, T]
    v: np.ndarray


def _tower_inputs(st: UserState, end: int) -> dict[str, np.ndarray]:
    """user_tower's inputs: st's first `end` history items."""
    assert st.hist_emb is not None
    return {"hist_emb": st.hist_emb[:, :end], "hist_item": st.hist_idx[:, :end], "hist_valid": st.hist_valid[:, :end]}


def _tower_extend_inputs(past_k: np.ndarray, past_v: np.ndarray, st: UserState, start: int) -> dict[str, np.ndarray]:
    """user_tower_extend's inputs: the K/V of st's first `start` items, and its items from `start` on."""
    assert st.hist_emb is not None
    return {"past_k": past_k, "past_v": past_v, "new_emb": st.hist_emb[:, start:], "new_item": st.hist_idx[:, start:]}


@dataclass
class Result:
    items: list[dict]
    degraded: list[str] = field(default_factory=list)
    timings: StageTimer = field(default_factory=StageTimer)
    candidates_ranked: int = 0
    candidates_recalled: int = 0


class Recommender:
    def __init__(
        self,
        settings: Settings,
        manifest: Manifest,
        catalog: Catalog,
        backend: InferenceBackend,
        store: FeatureStore,
        retriever: Retriever,
        metrics: Metrics,
        tokens: ItemTokens,
        fallback_backend: InferenceBackend | None = None,
    ):
        self.s = settings
        self.manifest = manifest
        self.dims = manifest.dims
        self.catalog = catalog
        self.backend = backend
        self.fallback = fallback_backend
        self.store = store
        self.retriever = retriever
        self.metrics = metrics
        self.tokens = tokens
        self.kv_cache: LRU[tuple, dict[str, np.ndarray]] = LRU(settings.kv_cache_users, settings.kv_cache_ttl_s)
        self.user_vec_cache: LRU[tuple, np.ndarray] = LRU(settings.user_vec_cache_users, settings.kv_cache_ttl_s)
        self.tower_states: LRU[tuple, TowerState] = LRU(settings.tower_state_users, settings.kv_cache_ttl_s)
        self.num_candidates = settings.num_candidates or manifest.num_candidates
        self.microbatch = settings.microbatch or manifest.microbatch
        self._rank_cost_s = 20e-6  # EWMA of ranking seconds per candidate, learned online
        # At most `max_active` requests run the pipeline at once; the rest wait in arrival order. Letting all of
        # them in shares the cores among every request, so a burst makes all of them late instead of a few.
        self._slots = asyncio.Semaphore(settings.max_active)
        self.waiting = 0
        self._hold_s = 5e-3  # EWMA of how long a request holds a slot: what one place in the queue costs
        self.batcher = (
            CandidateBatcher(
                self._run_candidates,
                self.microbatch,
                parallel=max(1, settings.inference_threads),  # inline (0) is one call at a time
                max_rows=settings.rank_batch_max_rows,
                max_wait_s=settings.rank_batch_wait_us / 1e6,
            )
            if settings.rank_batching
            else None
        )

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    # --- inference with fallback ---------------------------------------------------------------------
    async def _infer(
        self, model: str, inputs: dict, deadline: Deadline, degraded: list[str], required: bool = False
    ) -> dict:
        # Required stages (the user tower: without it there is nothing to answer) get a floor of time
        # even when the budget is spent; optional ones (ranking) are bounded by what is left.
        timeout = max(deadline.remaining(), REQUIRED_STAGE_FLOOR_S if required else 1e-3)
        try:
            return await self.backend.infer(model, inputs, timeout_s=timeout)
        except BackendUnavailable:
            # Only a failing backend falls back. A TimeoutError is this request's own budget running out:
            # running the model again elsewhere would only spend more past it.
            if self.fallback is None:
                raise
            reason = f"{self.backend.name} unavailable; fell back to {self.fallback.name}"  # no class names out
            if reason not in degraded:
                degraded.append(reason)
            return await self.fallback.infer(model, inputs)

    async def _run_candidates(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
        """One batched ranker_candidates call for the batcher: no deadline of its own (its rows belong to
        several requests, each of which waits only its own budget), the fallback backend when this one fails."""
        try:
            return await self.backend.infer(RANKER_CANDIDATES, inputs), None
        except BackendUnavailable:
            if self.fallback is None:
                raise
            reason = f"{self.backend.name} unavailable; fell back to {self.fallback.name}"
            return await self.fallback.infer(RANKER_CANDIDATES, inputs), reason

    async def _embeddings(self, raw_ids: np.ndarray, deadline: Deadline, degraded: list[str]) -> Embeddings:
        emb = await self.store.embeddings(raw_ids, deadline.remaining())
        if emb.degraded:
            degraded.append(emb.degraded)
        if emb.cache_hits is not None:
            self.metrics.cache_many("embeddings", emb.cache_hits, len(raw_ids))
        return emb

    def _note_store(self, degraded: list[str]) -> None:
        if not self.store.healthy:
            degraded.append(f"store {self.store.name} unavailable: served from the local cache and request data")

    async def warmup(self, rounds: int = 3) -> None:
        """Run the whole pipeline on a stored history before taking traffic: ONNX Runtime's first runs
        allocate its arenas and the first requests otherwise took ~40 ms (load-test plots, first second)."""
        histories = self.catalog.user_histories.values()
        items, ts = max(histories, key=lambda h: len(h[0]), default=(np.empty(0), np.empty(0)))
        if len(items) == 0:
            return
        history = list(zip(items[-self.dims.max_len :].tolist(), ts[-self.dims.max_len :].tolist(), strict=True))
        for _ in range(rounds):
            try:
                await self.recommend(None, history, 10, True, None, Deadline(5.0))
            except Exception as e:  # noqa: BLE001 - a cold start must not fail on warm-up
                log.warning("warm-up request failed: %r", e)
                return
        try:  # the tower's extension graph too, else its first run lands on the first returning user
            await self._warm_tower_extension(history)
        except Exception as e:  # noqa: BLE001
            log.warning("warm-up of %s failed: %r", USER_TOWER_EXTEND, e)

    async def _warm_tower_extension(self, history: list[tuple[int, int]], rounds: int = 3) -> None:
        items = np.array([i for i, _ in history], np.int64)
        ts = np.array([t for _, t in history], np.int64)
        st = await self.user_state(History(items, ts, None), Deadline(5.0), [])
        assert st.hist_emb is not None
        if len(st.hist_raw) < 2:
            return
        p = len(st.hist_raw) - 1
        full = await self._infer(USER_TOWER, _tower_inputs(st, p), Deadline(5.0), [], required=True)
        for _ in range(rounds):
            extend = _tower_extend_inputs(full["user_k"], full["user_v"], st, p)
            await self._infer(USER_TOWER_EXTEND, extend, Deadline(5.0), [], required=True)

    def expected_wait(self) -> float:
        """Seconds until a newcomer gets a slot: the queue ahead drains max_active at a time."""
        if not self._slots.locked():
            return 0.0
        return (self.waiting + 0.5) * self._hold_s / self.s.max_active

    @asynccontextmanager
    async def admitted(self, deadline: Deadline, patient: bool = False) -> AsyncIterator[None]:
        """A pipeline slot, in arrival order.

        An interactive request waits at most its budget, and is refused at once when the queue ahead of it
        cannot drain within that budget: waiting it out only to answer 503 (p50 28 ms at 2x load) helped nobody.
        A `patient` one (a batch user over gRPC) waits as long as its caller does, and its budget counts from
        admission: batch work queues behind and among interactive requests instead of failing.
        """
        if self._slots.locked():
            if not patient and self.expected_wait() > deadline.remaining():
                raise Overloaded(
                    f"overloaded: {self.waiting} requests queued ahead cannot finish within the "
                    f"{deadline.budget_s * 1000:g} ms budget"
                )
            self.waiting += 1
            try:
                if patient:
                    await self._slots.acquire()
                else:
                    await asyncio.wait_for(self._slots.acquire(), max(deadline.remaining(), 0.0))
            except TimeoutError as e:
                raise Overloaded(
                    f"overloaded: no pipeline slot within the {deadline.budget_s * 1000:g} ms budget "
                    f"({self.s.max_active} running, {self.waiting} waiting)"
                ) from e
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        admitted_at = time.perf_counter()
        if patient:
            deadline.start = admitted_at
        try:
            yield
        finally:
            self._slots.release()
            self._hold_s = 0.9 * self._hold_s + 0.1 * (time.perf_counter() - admitted_at)

    def _learn_rank_cost(self, seconds: float, m: int) -> None:
        # Charged as at least one full microbatch: a call over a few candidates costs about as much as one
        # over b_m (fixed per-call overhead). Dividing by the few would inflate the per-candidate estimate,
        # shrink the next request's m further and lock the service into ranking a handful (seen under load).
        per = seconds / max(m, self.microbatch)
        self._rank_cost_s = 0.8 * self._rank_cost_s + 0.2 * per

    # --- stages --------------------------------------------------------------------------------------
    async def resolve_history(
        self, user_id: int | None, history: list[tuple[int, int]] | None, deadline: Deadline, degraded: list[str]
    ) -> History:
        if history:
            items = np.array([h[0] for h in history], np.int64)
            ts = np.array([h[1] for h in history], np.int64)
            unknown = [int(i) for i in items if int(i) not in self.catalog.index_of]
            if unknown:
                raise BadRequest("history", f"unknown item ids in history: {unknown[:10]}")
            order = np.argsort(ts, kind="stable")
            items, ts = items[order], ts[order]
        else:
            if user_id is None:
                raise BadRequest("user_id", "give a user_id or a non-empty history")
            try:
                found = await self.store.history(user_id, deadline.remaining())
            except StoreUnavailable as e:
                raise Unavailable(
                    f"user history store unavailable ({e.public}); retry shortly or send the history in the request"
                ) from e
            if found is None or len(found[0]) == 0:
                raise UnknownUser(f"unknown user {user_id} and no history in the request")
            items, ts = found
        L = self.dims.max_len
        return History(items[-L:], ts[-L:], user_id)

    def history_state(self, h: History) -> UserState:
        """The user's inputs without their content embeddings: enough for the cache keys."""
        return UserState(
            hist_raw=h.items,
            hist_idx=self.catalog.model_index(h.items)[None, :],
            hist_emb=None,
            hist_ts=h.ts[None, :],
            hist_valid=np.ones((1, len(h.items)), np.float32),
            store_version=self._store_version(),
        )

    def _store_version(self) -> object:
        return getattr(self.store, "version", None)

    async def cached_user_state(self, h: History, query_ts: int, deadline: Deadline, degraded: list[str]) -> UserState:
        """The user's state, from the caches when the history is unchanged (then neither the embeddings nor
        the models run), else with the embeddings fetched and the missing parts left for the stages.

        Both caches are keyed by exactly the items (raw ids and times) an entry was computed from, and an item's
        embedding never changes under one store version, so the lookup with the whole history here is sound
        even when an earlier request stored an entry for a history with some items dropped (other key)."""
        st = self.history_state(h)
        kv = self.kv_cache.get(self._kv_key(h, st, query_ts))
        uv = self.user_vec_cache.get(self._uv_key(st))
        self.metrics.cache("kv", kv is not None)
        self.metrics.cache("user_vec", uv is not None)
        if kv is not None and uv is not None:
            st.kv, st.user_vec = kv, uv
            return st
        full = await self.user_state(h, deadline, degraded)
        if len(full.hist_raw) == len(st.hist_raw):  # nothing dropped: the lookups above were for this state
            full.kv, full.user_vec = kv, uv
        return full

    async def user_state(self, h: History, deadline: Deadline, degraded: list[str]) -> UserState:
        version = self._store_version()  # before the fetch: see UserState.store_version
        emb = await self._embeddings(h.items, deadline, degraded)
        keep = emb.found
        if not keep.all():
            if not keep.any():
                if emb.store_down:  # an outage, not an unknown item: retrying can help
                    raise Unavailable("embedding store unavailable and no history item in the local cache")
                raise UnknownUser("no content embedding available for any history item")
            degraded.append(f"{int((~keep).sum())} history items without embeddings were dropped")
        items, ts, vecs = h.items[keep], h.ts[keep], emb.vectors[keep]
        return UserState(
            hist_raw=items,
            hist_idx=self.catalog.model_index(items)[None, :],
            hist_emb=vecs[None, :, :],
            hist_ts=ts[None, :],
            hist_valid=np.ones((1, len(items)), np.float32),
            store_version=version,
        )

    def _kv_key(self, h: History, st: UserState, query_ts: int) -> tuple:
        # The newest position's time bias counts to the query time, through its log-time buckets only: the same
        # history with the same buckets has the same K/V (a later request reuses them; a new event never does).
        # Raw ids, not model indices: every live-added item has model index 0, and two such histories differ only in
        # their content embeddings. An item's embedding never changes under one store version (POST /v1/items
        # refuses known ids), so (raw ids, times, buckets, store version) fixes the K/V exactly: an appended event
        # changes the key and can never be served stale K/V.
        buckets = time_buckets(query_ts - st.hist_ts[0], self.dims.num_time_buckets)
        raw = st.hist_raw.astype(np.int64).tobytes() + st.hist_ts.tobytes() + buckets.tobytes()
        fp = hashlib.blake2b(raw, digest_size=12).digest()
        return (h.user_id, fp, self.manifest.model_version, st.store_version)

    def _uv_key(self, st: UserState) -> tuple:
        # The user tower reads the items only (ids and content, no times); same reasoning as _kv_key.
        fp = hashlib.blake2b(st.hist_raw.astype(np.int64).tobytes(), digest_size=12).digest()
        return (fp, self.manifest.model_version, st.store_version)

    async def user_vector(
        self, st: UserState, deadline: Deadline, degraded: list[str], user_id: int | None = None
    ) -> np.ndarray:
        if st.user_vec is None:
            st.user_vec = self.user_vec_cache.get(self._uv_key(st))  # an entry for the history minus dropped items
        if st.user_vec is None:
            tower = await self._user_tower(st, deadline, degraded, user_id)
            st.user_vec = tower.user_vec
            self.user_vec_cache.put(self._uv_key(st), st.user_vec)
        return st.user_vec

    def _tower_key(self, user_id: int | None, store_version: object) -> tuple | None:
        # Per user, not per history: the entry is the user's last computed history, which the next one extends.
        return None if user_id is None else (user_id, self.manifest.model_version, store_version)

    async def _user_tower(
        self, st: UserState, deadline: Deadline, degraded: list[str], user_id: int | None
    ) -> TowerState:
        """The user tower over st's history: continued from the user's previous history when that is a prefix of
        this one (events appended since, window not yet sliding: only the new positions are computed), else in
        full. The outputs equal a full pass's (its positions count from the oldest item; tested to 1e-5)."""
        assert st.hist_emb is not None
        key = self._tower_key(user_id, st.store_version)
        past = self.tower_states.get(key) if key is not None else None
        n, p = len(st.hist_raw), 0 if past is None else len(past.hist_raw)
        # A prefix of the raw ids fixes those positions exactly: the tower reads items only (ids and content, and an
        # item's content never changes under one store version, which the key carries).
        prefix = past is not None and 2 <= p <= n and np.array_equal(past.hist_raw, st.hist_raw[:p])
        if key is not None:
            self.metrics.cache("tower_state", prefix)
        if prefix and p == n:
            return past
        if prefix:
            extend = _tower_extend_inputs(past.k, past.v, st, p)
            out = await self._infer(USER_TOWER_EXTEND, extend, deadline, degraded, required=True)
            k = np.concatenate([past.k, out["new_k"]], axis=2)
            v = np.concatenate([past.v, out["new_v"]], axis=2)
        else:
            out = await self._infer(USER_TOWER, _tower_inputs(st, n), deadline, degraded, required=True)
            k, v = out["user_k"], out["user_v"]
        state = TowerState(st.hist_raw.copy(), out["user_vec"], k, v)
        if key is not None:
            if n < self.dims.max_len:
                self.tower_states.put(key, state)
            else:  # a full window cannot be extended (the next event slides it: every position moves)
                self.tower_states.pop(key)
        return state

    async def history_kv(
        self, h: History, st: UserState, query_ts: int, deadline: Deadline, degraded: list[str], required: bool = False
    ) -> None:
        if st.kv is not None:  # cached_user_state found it (and counted the lookup)
            return
        key = self._kv_key(h, st, query_ts)
        kv = self.kv_cache.get(key)  # differs from cached_user_state's key only when items were dropped
        if kv is None:
            assert st.hist_emb is not None
            kv = await self._infer(
                RANKER_HISTORY,
                {
                    "hist_emb": st.hist_emb,
                    "hist_item": st.hist_idx,
                    "hist_ts": st.hist_ts,
                    "hist_valid": st.hist_valid,
                    "query_ts": np.array([[query_ts]], np.int64),
                },
                deadline,
                degraded,
                required,
            )
            self.kv_cache.put(key, kv)
        st.kv = kv

    async def rank(
        self,
        st: UserState,
        cand_idx: np.ndarray,
        query_ts: int,
        deadline: Deadline,
        degraded: list[str],
        required: bool = False,
    ) -> np.ndarray:
        """Scores for the candidates (item indices), in microbatches, each one isolated (M-FALCON): batched with
        other requests' (self.batcher), or this request's own calls run concurrently. `required`: the answer is
        these scores (/v1/score), so they get the required stages' floor of time, as the user tower does."""
        assert st.kv is not None
        base = {
            "hist_k": st.kv["hist_k"],
            "hist_v": st.kv["hist_v"],
            "hist_q": st.kv["hist_q"],
            "hist_ts": st.hist_ts,
            "hist_valid": st.hist_valid,
            "query_ts": np.array([[query_ts]], np.int64),
        }
        tokens = self.tokens.gather(cand_idx)  # [m, d]: content + ID already projected, per item at build time
        if self.batcher is not None:
            floor = REQUIRED_STAGE_FLOOR_S if required else 1e-3
            scores, reason = await asyncio.wait_for(self.batcher.score(base, tokens), max(deadline.remaining(), floor))
            if reason and reason not in degraded:
                degraded.append(reason)
            return scores
        bm = self.microbatch
        calls = [
            asyncio.ensure_future(
                self._infer(
                    RANKER_CANDIDATES,
                    {**base, "cand_token": tokens[None, a : a + bm]},
                    deadline,
                    degraded,
                    required,
                )
            )
            for a in range(0, len(cand_idx), bm)
        ]
        try:
            outs = await asyncio.gather(*calls)
        except BaseException:
            # One microbatch failed (timeout): the others are not needed. Cancelling drops those still queued
            # for an inference worker, which other requests need under exactly this kind of load.
            for c in calls:
                c.add_done_callback(_retrieve)
                c.cancel()
            raise
        return np.concatenate([o["scores"][0] for o in outs])

    # --- the whole request ---------------------------------------------------------------------------
    async def recommend(
        self,
        user_id: int | None,
        history: list[tuple[int, int]] | None,
        k: int,
        exclude_seen: bool,
        num_candidates: int | None,
        deadline: Deadline,
        query_ts: int | None = None,
    ) -> Result:
        res = Result(items=[], timings=StageTimer(start=deadline.start))
        deg, tm = res.degraded, res.timings
        async with self.admitted(deadline):
            tm.mark("queue")  # arrival -> pipeline: parsing, validation, the event loop, a free slot
            h = await self.resolve_history(user_id, history, deadline, deg)
            self._note_store(deg)
            tm.mark("history")
            qts = query_time(query_ts, deadline)
            st = await self.cached_user_state(h, qts, deadline, deg)
            tm.mark("embeddings")
            # The ranker's history pass needs only the history: it runs beside the user tower, recall and the
            # candidate fetch (the second inference worker), and ranking waits for it.
            kv_task = asyncio.ensure_future(self.history_kv(h, st, qts, deadline, deg))
            kv_task.add_done_callback(_retrieve)
            try:
                return await self._recall_and_rank(h, st, kv_task, k, exclude_seen, num_candidates, deadline, qts, res)
            finally:
                kv_task.cancel()  # no-op when ranking awaited it; frees the worker when ranking was skipped

    async def _recall_and_rank(
        self,
        h: History,
        st: UserState,
        kv_task: asyncio.Future,
        k: int,
        exclude_seen: bool,
        num_candidates: int | None,
        deadline: Deadline,
        query_ts: int,
        res: Result,
    ) -> Result:
        deg, tm = res.degraded, res.timings
        user_vec = await self.user_vector(st, deadline, deg, h.user_id)
        tm.mark("user_tower")
        n = min(num_candidates or self.num_candidates, self.s.max_candidates, self.retriever.size)
        seen = np.unique(self.catalog.to_index(h.items)) if exclude_seen else np.empty(0, np.int64)
        ids, sims = self.retriever.search(user_vec, n + len(seen))
        keep = ids[0] > 0
        if exclude_seen:
            keep &= ~np.isin(ids[0], seen)
        cand_idx = ids[0][keep][:n].astype(np.int64)
        recall_scores = sims[0][keep][:n].astype(np.float32)
        res.candidates_recalled = len(cand_idx)
        tm.mark("retrieval")

        scores = recall_scores
        # Ranking needs the history K/V plus the candidates; shrink to what the budget allows.
        budget_for_rank = deadline.remaining() - RESPONSE_RESERVE_S
        # Plan with a margin over the learned mean: the cost per candidate varies with the CPU's state.
        affordable = int(budget_for_rank / (RANK_COST_MARGIN * self._rank_cost_s)) if budget_for_rank > 0 else 0
        m = min(len(cand_idx), max(affordable, 0))
        if m < len(cand_idx):
            deg.append(
                f"budget: ranked {m} of {len(cand_idx)} candidates"
                if m >= k
                else "budget: ranking skipped, recall order"
            )
        if m >= k and m > 0:
            t0 = deadline.elapsed()
            try:
                await kv_task
                tm.mark("ranker_history")
                scores = await self.rank(st, cand_idx[:m], query_ts, deadline, deg)
                cand_idx = cand_idx[:m]
                res.candidates_ranked = m
                self._learn_rank_cost(deadline.elapsed() - t0, m)
            except (TimeoutError, BackendUnavailable) as e:
                why = "timed out" if isinstance(e, TimeoutError) else "backend unavailable"
                deg.append(f"ranking failed ({why}); recall order")
            tm.mark("ranking")
        top = np.argsort(-scores, kind="stable")[:k]
        res.items = [
            {
                "item_id": int(self.catalog.raw_ids[cand_idx[i] - 1]),
                "score": float(scores[i]),
                "title": str(self.catalog.titles[cand_idx[i] - 1]),
            }
            for i in top
        ]
        tm.mark("topk")
        return res

    async def score(
        self,
        user_id: int | None,
        history: list[tuple[int, int]] | None,
        item_ids: list[int],
        deadline: Deadline,
        query_ts: int | None = None,
        patient: bool = False,  # a batch user: queue for a slot as long as the caller waits (see admitted)
    ) -> tuple[np.ndarray, list[str], StageTimer]:
        """Ranker scores of given items (no recall, no filtering, no shrinking: the caller asked for these).

        Nothing here can be shrunk to fit the budget, so the ranker passes are required stages: with a budget too
        small for them (budget_ms 0.1 answered 503 "retry shortly", and no retry could help) they get the floor of
        time the user tower gets, and the answer says it ran over (degraded). Overload is still shed on arrival."""
        deg: list[str] = []
        tm = StageTimer(start=deadline.start)
        unknown = [i for i in item_ids if i not in self.catalog.index_of]
        if unknown:
            raise BadRequest("item_ids", f"unknown item ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        async with self.admitted(deadline, patient):
            tm.mark("queue")
            h = await self.resolve_history(user_id, history, deadline, deg)
            self._note_store(deg)
            qts = query_time(query_ts, deadline)
            st = await self.cached_user_state(h, qts, deadline, deg)
            tm.mark("embeddings")
            await self.history_kv(h, st, qts, deadline, deg, required=True)
            tm.mark("ranker_history")
            # Candidates need no store: their ranker tokens are in memory (ItemTokens), live items' included.
            cand = self.catalog.to_index(np.array(item_ids, np.int64))
            scores = await self.rank(st, cand, qts, deadline, deg, required=True)
            tm.mark("ranking")
            if deadline.expired():
                deg.append(f"budget: scored after the {deadline.budget_s * 1000:g} ms budget ran out")
        return scores, deg, tm
