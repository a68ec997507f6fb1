"""How POST /v1/items reaches the ingestion worker and how its results reach every replica (API side, no torch).

- Redis (`RedisFeed`): jobs go into the `falconrec:ingest` stream (consumer group `workers`: any number of
  `falconrec ingest` processes share it, a crashed one's jobs are claimed by another). The worker writes each
  item's content embedding under the live version (`emb:{v}:{id}`) and appends it to `items:{v}:log`; every
  replica tails that log from its start, so a replica started later, or one that never saw the POST, serves the
  item too.
- No Redis (`PipeFeed`, the in-process default): the API's own worker child, over its stdin/stdout (JSON lines).

With `ingest_worker` = lazy/start the API spawns the worker as a child process (`python -m
service.ingest.worker`); the module is never imported here: torch and the LLM stay out of this process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from service.ingest.live import Conflict, IngestedItem, ItemJob
from service.redact import for_log
from service.settings import Settings
from service.stores.base import item_job_key

log = logging.getLogger("falconrec.ingest")

JOBS_STREAM = "falconrec:ingest"
GROUP = "workers"
WORKER_MODULE = "service.ingest.worker"
Apply = Callable[[list[IngestedItem]], Awaitable[int]]


# One script per POST /v1/items, all of its jobs or none, each job once: an id whose marker (item_job_key) holds
# another job's digest refuses the whole batch ({queued, index of the conflict}); a job whose marker holds its own
# digest was queued before (a retry: a frozen Redis ran the first attempt after its client had been told 503) and is
# not queued again. KEYS: the jobs stream, then each job's marker. ARGV: each job's JOB_FIELDS, in that order.
JOB_FIELDS = ("item_id", "text", "title", "submitted_at", "digest", "version")
ENQUEUE_LUA = """
local w = 6
for i = 2, #KEYS do
  local cur = redis.call('GET', KEYS[i])
  if cur and cur ~= ARGV[(i - 2) * w + 5] then
    return {0, i - 2}
  end
end
local queued = 0
for i = 2, #KEYS do
  local b = (i - 2) * w
  if redis.call('SET', KEYS[i], ARGV[b + 5], 'NX') then
    redis.call('XADD', KEYS[1], '*', 'item_id', ARGV[b + 1], 'text', ARGV[b + 2], 'title', ARGV[b + 3],
      'submitted_at', ARGV[b + 4], 'digest', ARGV[b + 5], 'version', ARGV[b + 6])
    queued = queued + 1
  end
end
return {queued, -1}
"""


def log_key(version: str) -> str:
    return f"items:{version}:log"


def encode_result(item: IngestedItem) -> dict[str, str]:
    out = {
        "item_id": str(item.item_id),
        "title": item.title,
        "emb": base64.b64encode(np.asarray(item.emb, np.float16).tobytes()).decode(),
        "submitted_at": repr(item.submitted_at),
    }
    if item.digest is not None:
        out["digest"] = item.digest
    return out


def encode_job(job: ItemJob, version: str | None = None) -> dict[str, str]:
    """A job as the worker reads it (stream fields, or a JSON line without the version)."""
    out = {
        "item_id": str(job.item_id),
        "text": job.text,
        "title": job.title,
        "submitted_at": repr(job.submitted_at),
        "digest": job.digest,
    }
    return out if version is None else {**out, "version": version}


def decode_result(fields: dict, dim: int) -> IngestedItem | None:
    """A log entry or a pipe line; None for one that is not a whole item of this model (skipped, logged)."""
    f = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    try:
        raw = f["emb"]
        emb = np.frombuffer(base64.b64decode(raw), np.float16)
        title = _as_str(f["title"])
        digest = _as_str(f["digest"]) if f.get("digest") else None
        if emb.shape != (dim,):
            raise ValueError(f"embedding of {emb.size} values, the model takes {dim}")
        return IngestedItem(int(f["item_id"]), title, emb, float(f["submitted_at"]), digest)
    except (KeyError, ValueError, TypeError) as e:
        log.warning("skipped a malformed ingested item: %s", for_log(e))
        return None


def _as_str(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def worker_command(settings: Settings, stdio: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        WORKER_MODULE,
        "--repo",
        str(Path(settings.model_repository).resolve()),
        "--batch",
        str(settings.ingest_batch),
        "--parent-pid",
        str(os.getpid()),
    ]
    return cmd + ["--stdio"] if stdio else cmd


class ItemFeed(ABC):
    def __init__(self, settings: Settings, dim: int, apply: Apply):
        self.s = settings
        self.dim = dim
        self.apply = apply
        self.proc: asyncio.subprocess.Process | None = None
        self._spawn_lock = asyncio.Lock()
        self.closing = False

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def submit(self, jobs: list[ItemJob]) -> None: ...

    @abstractmethod
    def describe(self) -> dict: ...

    async def _spawn(self, stdio: bool, env: dict[str, str]) -> asyncio.subprocess.Process:
        async with self._spawn_lock:
            if self.proc is None or self.proc.returncode is not None:
                self.proc = await asyncio.create_subprocess_exec(
                    *worker_command(self.s, stdio),
                    stdin=asyncio.subprocess.PIPE if stdio else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE if stdio else None,
                    env={**os.environ, **env},
                )
                log.info("started ingestion worker (pid %d)", self.proc.pid)
                await self._started(self.proc)
            return self.proc

    async def _started(self, proc: asyncio.subprocess.Process) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def _worker_state(self) -> dict:
        if self.proc is None:
            return {"worker": "not started" if self.s.ingest_worker != "off" else "external"}
        return {"worker": "running" if self.proc.returncode is None else f"exited {self.proc.returncode}"}


class PipeFeed(ItemFeed):
    """The in-process default: a worker child of this replica, fed over its stdin."""

    def __init__(self, settings: Settings, dim: int, apply: Apply):
        super().__init__(settings, dim, apply)
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        if self.s.ingest_worker == "start":
            await self._spawn(stdio=True, env={})

    async def _started(self, proc: asyncio.subprocess.Process) -> None:
        self._reader = asyncio.create_task(self._read(proc))

    async def submit(self, jobs: list[ItemJob]) -> None:
        if self.s.ingest_worker == "off":
            from service.pipeline.recommender import Unavailable

            raise Unavailable("no ingestion worker here: set FALCONREC_INGEST_WORKER=lazy, or use Redis")
        proc = await self._spawn(stdio=True, env={})
        assert proc.stdin is not None
        proc.stdin.write(("\n".join(json.dumps(encode_job(j)) for j in jobs) + "\n").encode())
        await proc.stdin.drain()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                if not self.closing:
                    log.warning("ingestion worker exited; the next POST /v1/items starts another")
                return
            try:
                item = decode_result(json.loads(line), self.dim)
            except ValueError as e:
                log.warning("ingestion worker wrote a line that is not JSON: %s", for_log(e))
                continue
            if item is not None:
                try:
                    await self.apply([item])
                except Exception as e:  # noqa: BLE001 - one bad item must not stop the feed
                    log.error("could not add item %d: %s", item.item_id, for_log(e))

    def describe(self) -> dict:
        return {"kind": "pipe", **self._worker_state()}

    async def close(self) -> None:
        self.closing = True
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()  # EOF: the worker finishes what it has and exits
        await super().close()
        if self._reader is not None:
            self._reader.cancel()


class RedisFeed(ItemFeed):
    """Jobs into a Redis stream for any worker; results tailed from the per-version item log by every replica."""

    def __init__(self, settings: Settings, dim: int, apply: Apply, version: Callable[[], str | None]):
        import redis.asyncio as aredis

        super().__init__(settings, dim, apply)
        assert settings.redis_url
        self.version = version
        # Its own connections: the tail blocks in XREAD for up to a second, beyond the request path's timeouts.
        self.client = aredis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.5, socket_timeout=5.0)
        self._enqueue = self.client.register_script(ENQUEUE_LUA)
        self._tail: asyncio.Task | None = None
        self.position = "0-0"
        self._caught_up: str | None = None
        self.applied = 0

    async def start(self) -> None:
        # Catch up with the items added so far before taking traffic: a replica started after a POST serves the
        # item from its first request. Bounded: with Redis down it starts anyway and the tail catches up later.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._catch_up(), 30.0)
        self._tail = asyncio.create_task(self._follow())
        if self.s.ingest_worker == "start":
            await self._spawn_worker()

    async def _spawn_worker(self) -> None:
        if self.s.ingest_worker != "off":
            # The URL goes through the environment, not argv (visible in `ps`): it may hold a password.
            await self._spawn(stdio=False, env={"FALCONREC_REDIS_URL": self.s.redis_url or ""})

    async def submit(self, jobs: list[ItemJob]) -> None:
        from service.pipeline.recommender import Unavailable

        version = self.version()
        if version is None:
            raise Unavailable("feature store unavailable: no live version to add items to; items not queued, retry")
        keys = [JOBS_STREAM, *(item_job_key(version, j.item_id) for j in jobs)]
        args = [v for j in jobs for v in map(encode_job(j, version).get, JOB_FIELDS)]
        try:
            queued, conflict = await asyncio.wait_for(self._enqueue(keys=keys, args=args), 2.0)
        except Exception as e:  # noqa: BLE001 - down or frozen: a frozen Redis runs the script when it resumes
            log.warning("could not queue items: %s", for_log(e))
            raise Unavailable(
                "feature store unavailable: the items may have been queued; retry the same request "
                "(a repeated job is not queued twice)"
            ) from e
        if conflict >= 0:
            j = jobs[conflict]
            raise Conflict(f"items.{conflict}.item_id", f"item {j.item_id} already exists or is being added")
        log.debug("queued %d of %d items (the rest were queued before)", queued, len(jobs))
        await self._spawn_worker()

    async def _catch_up(self) -> None:
        version = self._caught_up = self.version()
        while version is not None:
            resp = await self.client.xread({log_key(version): self.position}, count=1024)
            entries = resp[0][1] if resp else []
            if not entries:
                return
            self.applied += await self.apply([it for _, f in entries if (it := decode_result(f, self.dim))])
            self.position = _as_str(entries[-1][0])

    async def _follow(self) -> None:
        version = self._caught_up  # self.position is where _catch_up left this version's log
        failed = False
        while True:
            v = self.version()
            if v is None:
                await asyncio.sleep(self.s.redis_retry_s)
                continue
            if v != version:  # a new data version has its own log: start from its beginning
                version, self.position = v, "0-0"
            try:
                resp = await self.client.xread({log_key(version): self.position}, count=256, block=1000)
                failed = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis down: the store reports it; retry quietly
                if not failed:
                    log.warning("item log unavailable: %s", for_log(e))
                failed = True
                await asyncio.sleep(self.s.redis_retry_s)
                continue
            for _, entries in resp or []:
                items = [it for _, f in entries if (it := decode_result(f, self.dim)) is not None]
                try:
                    self.applied += await self.apply(items)
                except Exception as e:  # noqa: BLE001 - retried from the same position
                    log.error("could not add live items: %s", for_log(e))
                    await asyncio.sleep(self.s.redis_retry_s)
                    break
                self.position = _as_str(entries[-1][0])

    def describe(self) -> dict:
        return {"kind": "redis", "log_position": self.position, "applied": self.applied, **self._worker_state()}

    async def close(self) -> None:
        if self._tail is not None:
            self._tail.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._tail
        await super().close()
        await self.client.aclose()
