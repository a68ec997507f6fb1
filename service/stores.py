"""Where content embeddings and user histories come from: in-process (the embedded default) or Redis.

Redis layout (one place for it; exporters/redis_loader.py writes it):
    falconrec:version            -> the live data version (flipped last, atomically)
    emb:{version}:{item_id}      -> float16 bytes of the item's content embedding
    hist:{version}:{user_id}     -> little-endian int64 item ids, then int64 timestamps
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from service.catalog import Catalog
from service.embedding_cache import EmbeddingCache
from service.lru import LRU
from service.redact import for_log, public_reason

log = logging.getLogger("falconrec.store")

VERSION_KEY = "falconrec:version"


def emb_key(version: str, item_id: int) -> str:
    return f"emb:{version}:{item_id}"


def hist_key(version: str, user_id: int) -> str:
    return f"hist:{version}:{user_id}"


def pack_history(items: np.ndarray, ts: np.ndarray) -> bytes:
    return items.astype("<i8").tobytes() + ts.astype("<i8").tobytes()


def unpack_history(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    a = np.frombuffer(raw, dtype="<i8")
    n = len(a) // 2
    return a[:n].astype(np.int64), a[n:].astype(np.int64)


class StoreUnavailable(RuntimeError):
    """The store cannot answer now. The message is safe to show: `public_reason`, never the URL."""

    def __init__(self, public: str):
        super().__init__(public)
        self.public = public


@dataclass
class Embeddings:
    vectors: np.ndarray  # float32 [n, E]; zeros where missing
    found: np.ndarray  # bool [n]
    degraded: str | None = None  # why some could not be fetched
    cache_hits: int | None = None  # rows served by a local cache in front of a remote store (None: no cache)
    store_down: bool = False  # the missing rows are missing because the store is down, not unknown


class FeatureStore(ABC):
    name = "abstract"

    @abstractmethod
    async def embeddings(self, item_ids: np.ndarray, timeout_s: float) -> Embeddings: ...

    @abstractmethod
    async def history(self, user_id: int, timeout_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """(raw item ids, timestamps) oldest first, or None for an unknown user. Raises StoreUnavailable."""

    @abstractmethod
    def status(self) -> dict: ...

    @property
    def healthy(self) -> bool:
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass


class InProcessStore(FeatureStore):
    """Everything in memory from the built artifacts: no network, used when no Redis is configured."""

    name = "in-process"

    def __init__(self, catalog: Catalog, content_emb: np.ndarray):
        self.catalog = catalog
        self.table = np.zeros((content_emb.shape[0] + 1, content_emb.shape[1]), np.float32)
        self.table[1:] = content_emb

    async def embeddings(self, item_ids, timeout_s):
        idx = self.catalog.to_index(item_ids)
        return Embeddings(self.table[idx], idx > 0)

    async def history(self, user_id, timeout_s):
        return self.catalog.user_histories.get(int(user_id))

    def status(self) -> dict:
        return {"store": self.name, "ok": True, "items": self.catalog.num_items}


class RedisStore(FeatureStore):
    """Redis with one MGET per request for embeddings, a bounded LRU in front, and a short timeout.

    When Redis is down or slow, requests are answered from the LRU and the request's own history
    (degraded); a background task reconnects and re-reads the version pointer.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        dim: int,
        timeout_s: float,
        cache_items: int,
        retry_s: float = 1.0,
        history_cache_users: int = 50_000,
    ):
        import redis.asyncio as aredis

        self.url = url
        self.dim = dim
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.client = aredis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=1.0, health_check_interval=0, retry_on_timeout=False
        )
        self.cache = EmbeddingCache(cache_items, dim)
        # Read only when Redis fails (every other read goes to Redis and refreshes the entry), so it has no
        # TTL: with one (60 s) an outage longer than the TTL turned every user into a failure.
        self.hist_cache: LRU[tuple[str, int], tuple[np.ndarray, np.ndarray]] = LRU(history_cache_users)
        self.version: str | None = None
        self.ok = False
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._refresh()
        self._task = asyncio.create_task(self._watch())

    async def _refresh(self) -> None:
        try:
            v = await asyncio.wait_for(self.client.get(VERSION_KEY), 1.0)
            if v is None:
                raise StoreUnavailable(f"no data loaded ({VERSION_KEY} not set): run `falconrec load-redis`")
            v = v.decode()
            if v != self.version:
                log.info("redis data version %s", v)
            self.version, self.ok, self.last_error = v, True, None
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable right now"
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        if self.ok or self.last_error is None:
            log.warning("redis unavailable: %s", for_log(e))  # never the URL: it may hold a password
        self.ok = False
        self.last_error = public_reason(e)
        # Drop the pooled sockets: after a restart they are dead, and a stalled server keeps them busy.
        pool = self.client.connection_pool
        asyncio.get_running_loop().create_task(pool.disconnect(inuse_connections=True))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            await self._refresh()

    async def _call(self, coro, timeout_s: float):
        if not self.ok or self.version is None:
            coro.close()
            raise StoreUnavailable(self.last_error or "not connected")
        try:
            # The store's own short timeout, not the request's remaining budget: a request that has
            # already spent its budget must not mark a healthy Redis as down.
            return await asyncio.wait_for(coro, self.timeout_s)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            raise StoreUnavailable(self.last_error or "error") from e

    async def embeddings(self, item_ids, timeout_s):
        ids = np.asarray(item_ids, np.int64)
        version = self.version or ""
        out, found = self.cache.get(version, ids)
        todo = np.flatnonzero(~found)
        if todo.size == 0:
            return Embeddings(out, found, cache_hits=len(ids))
        hits = len(ids) - int(todo.size)
        try:
            vals = await self._call(self.client.mget([emb_key(version, i) for i in ids[todo].tolist()]), timeout_s)
        except StoreUnavailable as e:
            msg = f"redis: {e}; {todo.size} of {len(ids)} embeddings not in the local cache"
            return Embeddings(out, found, msg, cache_hits=hits, store_down=True)
        width = 2 * self.dim  # float16 bytes; a value of another size is not this model's embedding
        got = [j for j, raw in enumerate(vals) if raw is not None and len(raw) == width]
        if got:
            rows = todo[got]
            vecs = np.frombuffer(b"".join(vals[j] for j in got), np.float16).reshape(len(got), self.dim)
            out[rows] = vecs
            found[rows] = True
            self.cache.put(version, ids[rows], vecs)
        return Embeddings(out, found, cache_hits=hits)

    async def history(self, user_id, timeout_s):
        key = (self.version or "", int(user_id))
        try:
            raw = await self._call(self.client.get(hist_key(self.version or "", int(user_id))), timeout_s)
        except StoreUnavailable:
            cached = self.hist_cache.get(key)
            if cached is not None:
                return cached
            raise
        if raw is None:
            return None
        h = unpack_history(raw)
        self.hist_cache.put(key, h)
        return h

    @property
    def healthy(self) -> bool:
        return self.ok

    def status(self) -> dict:
        return {
            "store": self.name,
            "ok": self.ok,  # no URL: responses carry no address or credential
            "version": self.version,
            "error": self.last_error,
            "cached_embeddings": len(self.cache),
            "checked_at": time.time(),
        }

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.client.aclose()
