"""The ingestion worker a replica spawned, supervised (issue 22, point 4).

A worker killed right after a 30-item POST left all 30 items unserved for good: nothing restarted it, /readyz said
ok, and the ids answered 409 for 300 s. Now the replica that spawned a worker watches it: when it exits while jobs
wait, it is started again after a backoff (1 s, doubling to 30 s; reset after a minute of running), and the feed
hands the new worker the dead one's jobs (Redis: claimed from the stream's pending list; pipe: sent again).

The worker writes `{"ready": <pid>}` on stdout once its text model is loaded: until then it takes no job, and a
replica with jobs waiting reports itself degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from service.redact import for_log
from service.settings import Settings

log = logging.getLogger("falconrec.ingest")

# The worker is the `falconrec ingest` command (training/ingest_worker.py: torch), run as a child; never imported here.
WORKER_COMMAND = ("-m", "falconrec.cli", "ingest")
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
STABLE_S = 60.0  # a worker that ran this long before it exited starts the backoff afresh
OnLine = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class QueueStats:
    waiting: int = 0  # jobs queued and not done
    oldest_s: float = 0.0  # age of the oldest of them


def worker_command(settings: Settings, stdio: bool, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, *WORKER_COMMAND, "--repo", str(Path(settings.model_repository).resolve())]
    cmd += ["--batch", str(settings.ingest_batch), "--parent-pid", str(os.getpid()), *extra]
    cmd += ["--nice", str(settings.ingest_nice)]
    return cmd + ["--stdio"] if stdio else cmd


class WorkerProcess:
    """One worker child at a time: spawned on demand, its stdout read (readiness, then results in stdio mode), its
    exit noted with the time the next restart is due."""

    def __init__(self, settings: Settings, on_line: OnLine):
        self.s = settings
        self.on_line = on_line
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False  # the current process has loaded its text model
        self.restarts = 0
        self.closing = False
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task | None = None
        self._started_at = 0.0
        self._failures = 0
        self._restart_at = 0.0
        self._exit_noted = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def ensure(self, stdio: bool, env: dict[str, str], extra: tuple[str, ...] = ()) -> tuple[object, bool]:
        """The running process, or a new one: (process, whether it is new)."""
        async with self._lock:
            if self.alive:
                return self.proc, False
            self.proc = await asyncio.create_subprocess_exec(
                *worker_command(self.s, stdio, extra),
                stdin=asyncio.subprocess.PIPE if stdio else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, **env},
            )
            self.ready, self._exit_noted, self._started_at = False, False, time.monotonic()
            self._reader = asyncio.create_task(self._read(self.proc))
            log.info("started ingestion worker (pid %d)", self.proc.pid)
            return self.proc, True

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError as e:
                log.warning("ingestion worker wrote a line that is not JSON: %s", for_log(e))
                continue
            if isinstance(msg, dict) and "ready" in msg:
                self.ready = proc is self.proc
                continue
            try:
                await self.on_line(msg)
            except Exception as e:  # noqa: BLE001 - one bad line must not stop the feed
                log.error("could not use an ingestion result: %s", for_log(e))

    def note_exit(self) -> None:
        """After the process exited: when the next one may start (doubling backoff while they keep dying)."""
        if self.proc is None or self.alive or self._exit_noted:
            return
        self._exit_noted = True
        ran = time.monotonic() - self._started_at
        self._failures = 1 if ran > STABLE_S else self._failures + 1
        delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (self._failures - 1))
        self._restart_at = time.monotonic() + delay
        if not self.closing:
            log.warning("ingestion worker exited with %s; restarting in %.0f s", self.proc.returncode, delay)

    def restart_due(self) -> bool:
        return time.monotonic() >= self._restart_at

    def state(self) -> str:
        if self.proc is None:
            return "not started"
        if self.alive:
            return "running" if self.ready else "starting"
        return f"exited {self.proc.returncode}"

    async def close(self) -> None:
        self.closing = True
        proc = self.proc
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()  # EOF: a stdio worker finishes what it has and exits
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            self._reader.cancel()
