"""How POST /v1/items reaches the ingestion worker and how its results reach every replica (API side, no torch).

- Redis (`RedisFeed`): jobs go into the `falconrec:ingest` stream (consumer group `workers`: any number of
  `falconrec ingest` processes share it, a crashed one's jobs are claimed by another). The worker appends each
  item (title and content embedding) to the live version's `items:{v}:log`; every
  replica tails that log from its start, so a replica started later, or one that never saw the POST, serves the
  item too.
- No Redis (`PipeFeed`, the in-process default): the API's own worker child, over its stdin/stdout (JSON lines).

With `ingest_worker` = lazy/start the API spawns the worker as a child process (`python -m
falconrec.cli ingest`) and supervises it (service.ingest.supervisor); the module is never imported here: torch and
the LLM stay out of this process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

import numpy as np

from service.errors import Conflict
from service.ingest.live import IngestedItem, ItemJob, LiveMetrics
from service.ingest.supervisor import QueueStats, WorkerProcess
from service.redact import for_log
from service.settings import Settings
from service.stores.base import item_job_key

log = logging.getLogger("falconrec.ingest")

JOBS_STREAM = "falconrec:ingest"
GROUP = "workers"
SUPERVISE_S = 1.0  # how often the queue is measured and the worker checked
Apply = Callable[[list[IngestedItem]], Awaitable[int]]


# One script per POST /v1/items, all of its jobs or none, each job once: an id whose marker (item_job_key) holds
# another job's digest refuses the whole batch ({queued, index of the conflict}); a job whose marker holds its own
# digest was queued before (a retry: a frozen Redis ran the first attempt after its client had been told 503) and is
# not queued again. KEYS: the jobs stream, then each job's marker. ARGV: each job's JOB_FIELDS, in that order.
JOB_FIELDS = ("item_id", "text", "title", "submitted_at", "digest", "version", "key")
ENQUEUE_LUA = """
local w = 7
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
      'submitted_at', ARGV[b + 4], 'digest', ARGV[b + 5], 'version', ARGV[b + 6], 'key', ARGV[b + 7])
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
    if item.key is not None:
        out["key"] = item.key
    return out


def encode_job(job: ItemJob, version: str | None = None) -> dict[str, str]:
    """A job as the worker reads it (stream fields, or a JSON line without the version)."""
    out = {
        "item_id": str(job.item_id),
        "text": job.text,
        "title": job.title,
        "submitted_at": repr(job.submitted_at),
        "digest": job.digest,
        "key": job.key or "",  # "" for an integer-id catalog (stream fields are strings)
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
        key = _as_str(f["key"]) if f.get("key") else None
        if emb.shape != (dim,):
            raise ValueError(f"embedding of {emb.size} values, the model takes {dim}")
        return IngestedItem(int(f["item_id"]), title, emb, float(f["submitted_at"]), digest, key)
    except (KeyError, ValueError, TypeError) as e:
        log.warning("skipped a malformed ingested item: %s", for_log(e))
        return None


def _as_str(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def consumer_name(pid: int) -> str:
    """The worker's consumer in the jobs stream's group: the API claims a dead worker's jobs by it."""
    return f"{socket.gethostname()}-{pid}"


class ItemFeed(ABC):
    """Jobs to the ingestion worker, results back; supervises the worker this replica spawned (restart with
    backoff, its jobs handed to the next one) and keeps the queue's size and age for /metrics and /readyz."""

    def __init__(self, settings: Settings, dim: int, apply: Apply, metrics: LiveMetrics | None = None):
        self.s = settings
        self.dim = dim
        self.apply = apply
        self.metrics = metrics
        self.worker = WorkerProcess(settings, self._on_line)
        self.queue = QueueStats()
        self._supervisor: asyncio.Task | None = None

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        return self.worker.proc

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def submit(self, jobs: list[ItemJob]) -> None: ...

    @abstractmethod
    def describe(self) -> dict: ...

    @abstractmethod
    async def _queue_stats(self) -> QueueStats: ...

    @abstractmethod
    async def _restart(self) -> None:
        """A new worker, handed the jobs the dead one had."""

    async def _on_line(self, msg: dict) -> None:  # noqa: B027 - optional hook: results on the worker's stdout
        pass

    def _supervise(self) -> None:
        self._supervisor = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_S)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis down: the store reports it; try again next tick
                log.debug("ingestion supervisor: %s", for_log(e))

    async def _tick(self) -> None:
        self.queue = await self._queue_stats()
        if self.metrics is not None:
            self.metrics.jobs_waiting.set(self.queue.waiting)
            self.metrics.oldest_job.set(self.queue.oldest_s)
        if not self._supervises() or self.worker.alive:
            return
        self.worker.note_exit()
        if (self.queue.waiting or self.s.ingest_worker == "start") and self.worker.restart_due():
            await self._restart()
            self.worker.restarts += 1
            if self.metrics is not None:
                self.metrics.worker_restarts.inc()

    def _supervises(self) -> bool:
        """Whether this replica keeps a worker: it spawned one (lazy) or runs one from the start."""
        mode = self.s.ingest_worker
        return mode == "start" or (mode == "lazy" and self.worker.proc is not None)

    def problem(self) -> str | None:
        """Why accepted items are not becoming servable here, for /readyz; None when nothing waits or a worker of
        ours can take the jobs."""
        if not self._supervises() or not self.queue.waiting or (self.worker.alive and self.worker.ready):
            return None
        w = self.worker
        return (
            f"ingestion worker {w.state()}: {self.queue.waiting} jobs waiting, the oldest {self.queue.oldest_s:.0f} s"
        )

    def _worker_state(self) -> dict:
        state = self.worker.state() if self.s.ingest_worker != "off" else "external"
        return {
            "worker": state,
            "restarts": self.worker.restarts,
            "jobs_waiting": self.queue.waiting,
            "oldest_job_s": round(self.queue.oldest_s, 3),
        }

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        await self.worker.close()


class PipeFeed(ItemFeed):
    """The in-process default: a worker child of this replica, fed over its stdin. Jobs stay here until their
    results come back, so a worker that dies takes none with it: the next one is sent them again."""

    def __init__(self, settings: Settings, dim: int, apply: Apply, metrics: LiveMetrics | None = None):
        super().__init__(settings, dim, apply, metrics)
        self.inflight: dict[int, ItemJob] = {}

    async def start(self) -> None:
        if self.s.ingest_worker == "start":
            await self._ensure_worker()
        self._supervise()

    async def submit(self, jobs: list[ItemJob]) -> None:
        if self.s.ingest_worker == "off":
            from service.errors import Unavailable

            raise Unavailable("no ingestion worker here: set FALCONREC_INGEST_WORKER=lazy, or use Redis")
        for j in jobs:
            self.inflight[j.item_id] = j
        proc, new = await self._ensure_worker()
        if not new:  # a new worker was sent every job in flight, these included
            await self._send(proc, jobs)

    async def _ensure_worker(self) -> tuple[asyncio.subprocess.Process, bool]:
        proc, new = await self.worker.ensure(stdio=True, env={})
        if new and self.inflight:
            await self._send(proc, list(self.inflight.values()))
        return proc, new

    async def _send(self, proc: asyncio.subprocess.Process, jobs: list[ItemJob]) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(("\n".join(json.dumps(encode_job(j)) for j in jobs) + "\n").encode())
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as e:  # it died: the jobs stay in flight for the next one
            log.warning("ingestion worker gone before taking %d jobs (%s); the next one gets them", len(jobs), e)

    async def _restart(self) -> None:
        await self._ensure_worker()

    async def _queue_stats(self) -> QueueStats:
        if not self.inflight:
            return QueueStats()
        oldest = min(j.submitted_at for j in self.inflight.values())
        return QueueStats(len(self.inflight), max(time.time() - oldest, 0.0))

    async def _on_line(self, msg: dict) -> None:
        item = decode_result(msg, self.dim)
        if item is not None:
            self.inflight.pop(item.item_id, None)
            await self.apply([item])

    def describe(self) -> dict:
        return {"kind": "pipe", **self._worker_state()}


class RedisFeed(ItemFeed):
    """Jobs into a Redis stream for any worker; results tailed from the per-version item log by every replica."""

    def __init__(
        self,
        settings: Settings,
        dim: int,
        apply: Apply,
        version: Callable[[], str | None],
        metrics: LiveMetrics | None = None,
    ):
        import redis.asyncio as aredis

        super().__init__(settings, dim, apply, metrics)
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
        self._supervise()

    async def _spawn_worker(self, extra: tuple[str, ...] = ()) -> None:
        if self.s.ingest_worker != "off":
            # The URL goes through the environment, not argv (visible in `ps`): it may hold a password.
            await self.worker.ensure(stdio=False, env={"FALCONREC_REDIS_URL": self.s.redis_url or ""}, extra=extra)

    async def _restart(self) -> None:
        # The dead worker's jobs sit in the stream's pending list under its consumer: the new one claims them at
        # once (left alone, another worker would claim them only after they idled --claim-after-s, 30 s).
        dead = self.worker.proc
        await self._spawn_worker(("--reclaim-from", consumer_name(dead.pid)) if dead is not None else ())

    async def _queue_stats(self) -> QueueStats:
        # Workers delete the jobs they finish: the stream is what waits (every replica's jobs, any worker's).
        n = await asyncio.wait_for(self.client.xlen(JOBS_STREAM), 1.0)
        if not n:
            return QueueStats()
        first = await asyncio.wait_for(self.client.xrange(JOBS_STREAM, count=1), 1.0)
        born_ms = int(_as_str(first[0][0]).split("-")[0]) if first else time.time() * 1000
        return QueueStats(int(n), max(time.time() - born_ms / 1000, 0.0))

    async def submit(self, jobs: list[ItemJob]) -> None:
        from service.errors import Unavailable

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
