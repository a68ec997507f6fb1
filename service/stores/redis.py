"""The Redis feature store (layout: service.stores.base)."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from service.lru import LRU
from service.redact import for_log, public_reason
from service.stores.base import (
    VERSION_KEY,
    Appended,
    Event,
    FeatureStore,
    StoreUnavailable,
    evid_key,
    hist_key,
    unpack_history,
)

log = logging.getLogger("falconrec.store")


# One script for a whole POST /v1/events: Redis runs it atomically, so every user of the batch gets its events or
# none does, and no reader sees half a history. KEYS: per user, hist then evid. ARGV: cap, dedup window, then per
# user: n, packed item ids, packed timestamps (in time order), n event ids ('' = none). Item ids are copied as
# bytes; only timestamps are decoded (struct '<i8' -> a Lua double: exact below 2^53, and validation keeps
# timestamps within a few minutes of now). Returns {written, duplicates}.
APPEND_LUA = """
local cap, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local a, written, dups = 3, 0, 0
for u = 1, #KEYS, 2 do
  local hk, dk = KEYS[u], KEYS[u + 1]
  local n, ids, tss = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  local ni, nt = {}, {}
  for j = 1, n do
    local eid = ARGV[a + j - 1]
    local t = struct.unpack('<i8', tss, 8 * j - 7)
    local fresh = true
    if eid ~= '' then
      if redis.call('ZSCORE', dk, eid) then
        fresh = false
      elseif window > 0 then
        redis.call('ZADD', dk, t, eid)
      end
    end
    if fresh then
      ni[#ni + 1] = string.sub(ids, 8 * j - 7, 8 * j)
      nt[#nt + 1] = t
      written = written + 1
    else
      dups = dups + 1
    end
  end
  a = a + n
  if window > 0 and n > 0 then
    redis.call('ZREMRANGEBYRANK', dk, 0, -(window + 1))
  end
  if #ni > 0 then
    local old = redis.call('GET', hk) or ''
    local m = #old / 16
    local oi, ot = {}, {}
    for k = 1, m do
      oi[k] = string.sub(old, 8 * k - 7, 8 * k)
      ot[k] = struct.unpack('<i8', old, 8 * m + 8 * k - 7)
    end
    -- merge two time-ordered lists; on equal times the stored entry first (as merge_history does)
    local mi, mt = {}, {}
    local x, y = 1, 1
    while x <= m or y <= #ni do
      if y > #ni or (x <= m and ot[x] <= nt[y]) then
        mi[#mi + 1], mt[#mt + 1] = oi[x], ot[x]
        x = x + 1
      else
        mi[#mi + 1], mt[#mt + 1] = ni[y], nt[y]
        y = y + 1
      end
    end
    local first = math.max(1, #mi - cap + 1)
    local pi, pt = {}, {}
    for k = first, #mi do
      pi[#pi + 1] = mi[k]
      pt[#pt + 1] = struct.pack('<i8', mt[k])
    end
    redis.call('SET', hk, table.concat(pi) .. table.concat(pt))
  end
end
return {written, dups}
"""


class RedisStore(FeatureStore):
    """Redis for histories and events, with a short timeout per call.

    When Redis is down or slow, requests are answered from the local history cache or the request's own history
    (degraded); a background task reconnects and re-reads the version pointer.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        timeout_s: float,
        retry_s: float = 1.0,
        history_cache_users: int = 50_000,
    ):
        import redis.asyncio as aredis

        self.url = url
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.client = aredis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=1.0, health_check_interval=0, retry_on_timeout=False
        )
        self._append = self.client.register_script(APPEND_LUA)
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

    async def _call(self, coro, timeout_s: float, limit_s: float | None = None):
        if not self.ok or self.version is None:
            coro.close()
            raise StoreUnavailable(self.last_error or "not connected")
        try:
            # The store's own short timeout, not the request's remaining budget: a request that has
            # already spent its budget must not mark a healthy Redis as down.
            return await asyncio.wait_for(coro, limit_s or self.timeout_s)
        except Exception as e:  # noqa: BLE001
            self._fail(e)
            raise StoreUnavailable(self.last_error or "error", sent=True) from e

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

    async def append_events(self, events, cap, dedup_window):
        by_user: dict[int, list[Event]] = {}
        for e in events:
            by_user.setdefault(e.user_id, []).append(e)
        version = self.version or ""
        keys: list[str] = []
        args: list[bytes | str | int] = [cap, dedup_window]
        for u, evs in by_user.items():
            keys += [hist_key(version, u), evid_key(version, u)]
            args += [
                len(evs),
                np.array([e.item_id for e in evs], "<i8").tobytes(),
                np.array([e.ts for e in evs], "<i8").tobytes(),
                *(e.event_id or "" for e in evs),
            ]
        # A write is not retried by the store's timeout logic: a timed-out script may still run (a frozen Redis runs
        # it when it resumes), and the caller's retry is made safe by event_ids (or ids derived from an
        # Idempotency-Key). Its own, longer timeout: it is not on a read's budget.
        written, dups = await self._call(self._append(keys=keys, args=args), 0.0, limit_s=max(self.timeout_s, 1.0))
        return Appended(int(written), int(dups), len(by_user))

    @property
    def healthy(self) -> bool:
        return self.ok

    def status(self) -> dict:
        return {
            "store": self.name,
            "ok": self.ok,  # no URL: responses carry no address or credential
            "version": self.version,
            "error": self.last_error,
            "checked_at": time.time(),
        }

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self.client.aclose()
