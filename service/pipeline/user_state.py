"""Per-user state of a request: its history, the history's items as rows of the per-item token tables, the user
tower's output and the ranker's history K/V, each computed at most once per history (caches keyed by exactly what an
entry was computed from) and the user tower continued from the user's previous history when events were only
appended. No content embedding is read here: both graphs take per-item tokens the build computed (ItemTokens)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from service.contract import RANKER_HISTORY, USER_TOWER, USER_TOWER_EXTEND, time_buckets
from service.errors import BadRequest, Unavailable, UnknownUser
from service.lru import LRU
from service.pipeline.deadline import Deadline
from service.pipeline.item_tokens import ItemTokens
from service.pipeline.serving import Serving
from service.stores.base import StoreUnavailable


@dataclass
class History:
    items: np.ndarray  # raw ids, oldest first, at most max_len
    ts: np.ndarray
    user_id: int | None


@dataclass
class UserState:
    """Everything ranking needs about the user, computed once per request (or taken from the cache)."""

    hist_raw: np.ndarray  # [L] raw item ids
    hist_rows: np.ndarray  # [L] item indices: rows of the token tables (items added live have their own)
    hist_ts: np.ndarray  # [1, L]
    hist_valid: np.ndarray  # [1, L]
    kv: dict[str, np.ndarray] | None = None  # hist_k, hist_v, hist_q
    user_vec: np.ndarray | None = None  # [1, T]
    kv_key: tuple | None = None  # the caches' keys of this state (cached_user_state hashes them once a request)
    uv_key: tuple | None = None
    # The store's data version when the history was read: the caches key by it, so after a reload of the store's
    # data (live items belong to their version, and an id may come back with another text) nothing computed before
    # is looked up again. Conservative: within one version an item's tokens never change.
    store_version: object = None


@dataclass(frozen=True)
class TowerState:
    """What the user tower computed for one user's history: enough to continue it by appended events."""

    hist_raw: np.ndarray  # [P] raw item ids it was computed from
    user_vec: np.ndarray  # [1, T]
    k: np.ndarray  # [1, layers, P, T]
    v: np.ndarray


def _tower_inputs(tokens: ItemTokens, st: UserState, end: int) -> dict[str, np.ndarray]:
    """user_tower's inputs: st's first `end` history items."""
    return {"hist_token": tokens.user.gather(st.hist_rows[None, :end]), "hist_valid": st.hist_valid[:, :end]}


def _tower_extend_inputs(
    past_k: np.ndarray, past_v: np.ndarray, tokens: ItemTokens, st: UserState, start: int
) -> dict[str, np.ndarray]:
    """user_tower_extend's inputs: the K/V of st's first `start` items, and its items from `start` on."""
    return {"past_k": past_k, "past_v": past_v, "new_token": tokens.user.gather(st.hist_rows[None, start:])}


class UserStates:
    """The per-user stages and their caches (K/V, user vectors, tower states)."""

    def __init__(self, sv: Serving):
        s = sv.settings
        self.sv = sv
        self.dims = sv.manifest.dims
        self.kv_cache: LRU[tuple, dict[str, np.ndarray]] = LRU(s.kv_cache_users, s.kv_cache_ttl_s)
        self.user_vec_cache: LRU[tuple, np.ndarray] = LRU(s.user_vec_cache_users, s.kv_cache_ttl_s)
        self.tower_states: LRU[tuple, TowerState] = LRU(s.tower_state_users, s.kv_cache_ttl_s)

    def note_store(self, degraded: list[str]) -> None:
        if not self.sv.store.healthy:
            degraded.append(f"store {self.sv.store.name} unavailable: served from the local cache and request data")

    async def warm_tower_extension(self, history: list[tuple[int, int]], rounds: int = 3) -> None:
        items = np.array([i for i, _ in history], np.int64)
        ts = np.array([t for _, t in history], np.int64)
        st = self.user_state(History(items, ts, None), [])
        if len(st.hist_raw) < 2:
            return
        p, tokens = len(st.hist_raw) - 1, self.sv.tokens
        full = await self.sv.infer(USER_TOWER, _tower_inputs(tokens, st, p), Deadline(5.0), [], required=True)
        for _ in range(rounds):
            extend = _tower_extend_inputs(full["user_k"], full["user_v"], tokens, st, p)
            await self.sv.infer(USER_TOWER_EXTEND, extend, Deadline(5.0), [], required=True)

    async def resolve_history(
        self, user_id: int | None, history: list[tuple[int, int]] | None, deadline: Deadline, degraded: list[str]
    ) -> History:
        if history:
            items = np.array([h[0] for h in history], np.int64)
            ts = np.array([h[1] for h in history], np.int64)
            unknown = [int(i) for i in items if int(i) not in self.sv.catalog.index_of]
            if unknown:
                raise BadRequest("history", f"unknown item ids in history: {unknown[:10]}")
            order = np.argsort(ts, kind="stable")
            items, ts = items[order], ts[order]
        else:
            if user_id is None:
                raise BadRequest("user_id", "give a user_id or a non-empty history")
            try:
                found = await self.sv.store.history(user_id, deadline.remaining())
            except StoreUnavailable as e:
                raise Unavailable(
                    f"user history store unavailable ({e.public}); retry shortly or send the history in the request"
                ) from e
            if found is None or len(found[0]) == 0:
                raise UnknownUser(f"unknown user {user_id} and no history in the request")
            items, ts = found
        L = self.dims.max_len
        return History(items[-L:], ts[-L:], user_id)

    def user_state(self, h: History, degraded: list[str]) -> UserState:
        """The history's items as token-table rows. A stored history may hold an item this catalog does not (a
        replica that has not seen a live item yet): it is dropped, and the answer says so."""
        rows = self.sv.catalog.to_index(h.items)
        items, ts = h.items, h.ts
        if not rows.all():
            keep = rows > 0
            if not keep.any():
                raise UnknownUser("none of the history's items is in this catalog")
            degraded.append(f"{int((~keep).sum())} history items not in the catalog were dropped")
            items, ts, rows = items[keep], ts[keep], rows[keep]
        return UserState(
            hist_raw=items,
            hist_rows=rows,
            hist_ts=ts[None, :],
            hist_valid=np.ones((1, len(items)), np.float32),
            store_version=self.store_version(),
        )

    def store_version(self) -> object:
        return getattr(self.sv.store, "version", None)

    def cached_user_state(self, h: History, query_ts: int, degraded: list[str]) -> UserState:
        """The user's state, with the K/V and the user vector from the caches when this history (and, for the K/V,
        its query-time buckets) was seen before: then neither model runs."""
        st = self.user_state(h, degraded)
        st.kv_key, st.uv_key = self._kv_key(h, st, query_ts), self._uv_key(st)
        st.kv = self.kv_cache.get(st.kv_key)
        st.user_vec = self.user_vec_cache.get(st.uv_key)
        self.sv.metrics.cache("kv", st.kv is not None)
        self.sv.metrics.cache("user_vec", st.user_vec is not None)
        return st

    def _kv_key(self, h: History, st: UserState, query_ts: int) -> tuple:
        # The newest position's time bias counts to the query time, through its log-time buckets only: the same
        # history with the same buckets has the same K/V (a later request reuses them; a new event never does).
        # Raw ids: an item's tokens never change under one model version (POST /v1/items refuses known ids), so
        # (raw ids, times, buckets, model and store version) fixes the K/V exactly: an appended event changes the
        # key and can never be served stale K/V.
        buckets = time_buckets(query_ts - st.hist_ts[0], self.dims.num_time_buckets)
        raw = st.hist_raw.astype(np.int64).tobytes() + st.hist_ts.tobytes() + buckets.tobytes()
        fp = hashlib.blake2b(raw, digest_size=12).digest()
        return (h.user_id, fp, self.sv.manifest.model_version, st.store_version)

    def _uv_key(self, st: UserState) -> tuple:
        # The user tower reads the items only (their tokens, no times); same reasoning as _kv_key.
        fp = hashlib.blake2b(st.hist_raw.astype(np.int64).tobytes(), digest_size=12).digest()
        return (fp, self.sv.manifest.model_version, st.store_version)

    async def user_vector(
        self, st: UserState, deadline: Deadline, degraded: list[str], user_id: int | None = None
    ) -> np.ndarray:
        if st.user_vec is None:
            tower = await self._user_tower(st, deadline, degraded, user_id)
            st.user_vec = tower.user_vec
            self.user_vec_cache.put(st.uv_key, st.user_vec)
        return st.user_vec

    def _tower_key(self, user_id: int | None, store_version: object) -> tuple | None:
        # Per user, not per history: the entry is the user's last computed history, which the next one extends.
        return None if user_id is None else (user_id, self.sv.manifest.model_version, store_version)

    async def _user_tower(
        self, st: UserState, deadline: Deadline, degraded: list[str], user_id: int | None
    ) -> TowerState:
        """The user tower over st's history: continued from the user's previous history when that is a prefix of
        this one (events appended since, window not yet sliding: only the new positions are computed), else in
        full. The outputs equal a full pass's (its positions count from the oldest item; tested to 1e-5)."""
        key = self._tower_key(user_id, st.store_version)
        past = self.tower_states.get(key) if key is not None else None
        n, p = len(st.hist_raw), 0 if past is None else len(past.hist_raw)
        # A prefix of the raw ids fixes those positions exactly: the tower reads items only (their tokens, which
        # never change under one model version, which the key carries).
        prefix = past is not None and 2 <= p <= n and np.array_equal(past.hist_raw, st.hist_raw[:p])
        if key is not None:
            self.sv.metrics.cache("tower_state", prefix)
        if prefix and p == n:
            return past
        if prefix:
            extend = _tower_extend_inputs(past.k, past.v, self.sv.tokens, st, p)
            out = await self.sv.infer(USER_TOWER_EXTEND, extend, deadline, degraded, required=True)
            k = np.concatenate([past.k, out["new_k"]], axis=2)
            v = np.concatenate([past.v, out["new_v"]], axis=2)
        else:
            out = await self.sv.infer(
                USER_TOWER, _tower_inputs(self.sv.tokens, st, n), deadline, degraded, required=True
            )
            k, v = out["user_k"], out["user_v"]
        state = TowerState(st.hist_raw.copy(), out["user_vec"], k, v)
        if key is not None:
            if n < self.dims.max_len:
                self.tower_states.put(key, state)
            else:  # a full window cannot be extended (the next event slides it: every position moves)
                self.tower_states.pop(key)
        return state

    async def history_kv(
        self, st: UserState, query_ts: int, deadline: Deadline, degraded: list[str], required: bool = False
    ) -> None:
        if st.kv is not None:  # cached_user_state found it (and counted the lookup)
            return
        kv = self.kv_cache.get(st.kv_key)  # another request may have put it since cached_user_state looked
        if kv is None:
            kv = await self.sv.infer(
                RANKER_HISTORY,
                {
                    "hist_token": self.sv.tokens.ranker.gather(st.hist_rows[None, :]),
                    "hist_ts": st.hist_ts,
                    "hist_valid": st.hist_valid,
                    "query_ts": np.array([[query_ts]], np.int64),
                },
                deadline,
                degraded,
                required,
            )
            self.kv_cache.put(st.kv_key, kv)
        st.kv = kv
