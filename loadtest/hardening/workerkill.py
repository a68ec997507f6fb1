"""7. workerkill: --kill-items new items POSTed, the server's ingestion worker child SIGKILLed right after, and no
further POST (issue 22, point 4: nothing restarted it and the items stayed unserved for good). Watched until all
are servable: how many became so and when, when a new worker appeared, what /readyz said meanwhile.
tests/test_ingest_supervision.py makes the same attack in-process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from dataclasses import dataclass, field

import httpx

from loadtest.hardening.stack import Stack
from loadtest.hardening.stats import fmt, numbers_out, table
from loadtest.hardening.traffic import post_items, servable, wait_servable
from loadtest.procs import find_descendant

WORKER_ARGV = ("falconrec.cli", "ingest")  # service/ingest/supervisor.py's WORKER_COMMAND
FIRST_ID = 7_700_000


@dataclass
class Watch:
    """What the wait looked like, poll by poll."""

    readyz: Counter = field(default_factory=Counter)  # status (and the ingestion reason) per poll
    readyz_first: dict[str, float] = field(default_factory=dict)  # each of those: first seen, seconds after the kill
    servable_at: dict[int, float] = field(default_factory=dict)  # item -> seconds after the kill
    new_worker_at: float | None = None
    new_worker_pid: int | None = None
    ok_again_at: float | None = None


def worker_pid(s: Stack) -> int | None:
    return find_descendant(s.server.pid, *WORKER_ARGV)


async def _readyz(c: httpx.AsyncClient) -> tuple[str, str]:
    """(status, the ingestion worker's reason if /readyz gives one)."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        body = (await c.get("/readyz")).json()
        reasons = [numbers_out(str(r)) for r in body.get("reasons", []) if "ingestion worker" in str(r)]
        return str(body.get("status")), (reasons[0] if reasons else "")
    return "no answer", ""


async def _watch(c: httpx.AsyncClient, s: Stack, ids: list[int], old_pid: int, w: Watch) -> None:
    """Poll /readyz, the worker's pid and each item until all are servable and /readyz is ok again (or time's up)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    waiting = set(ids)
    while loop.time() - t0 < s.opts.kill_wait_s:
        now = loop.time() - t0
        status, reason = await _readyz(c)
        said = f"{status}: {reason}" if reason else status
        w.readyz[said] += 1
        w.readyz_first.setdefault(said, now)
        pid = worker_pid(s)
        if w.new_worker_at is None and pid not in (None, old_pid):
            w.new_worker_at, w.new_worker_pid = now, pid
        for i in sorted(waiting):
            if await servable(c, i):
                w.servable_at[i] = loop.time() - t0
        waiting -= set(w.servable_at)
        if not waiting and status == "ok":
            w.ok_again_at = now  # this poll's /readyz (taken before the last items were seen servable)
            return
        await asyncio.sleep(0.1)


async def measure(s: Stack) -> tuple[str, dict]:
    a = s.opts
    ids = list(range(FIRST_ID, FIRST_ID + a.kill_items))
    w = Watch()
    async with httpx.AsyncClient(base_url=s.http_url, timeout=60.0) as c:
        # A worker that is up and has done a job: killed, it dies holding some of the new ones.
        warm = FIRST_ID - 1
        await post_items(c, s, [warm])
        warm_left = await wait_servable(c, [warm], a.item_wait_s)
        old_pid = worker_pid(s)
        r = await post_items(c, s, ids)
        if old_pid is not None:
            os.kill(old_pid, signal.SIGKILL)
            await _watch(c, s, ids, old_pid, w)
    raw = {
        "post_status": r.status_code,
        "warm_servable": not warm_left,
        "worker_pid": old_pid,
        "servable": len(w.servable_at),
        "all_servable_s": max(w.servable_at.values()) if len(w.servable_at) == len(ids) else None,
        "first_servable_s": min(w.servable_at.values(), default=None),
        "new_worker_s": w.new_worker_at,
        "ready_ok_again_s": w.ok_again_at,
        "readyz_polls": dict(w.readyz),
        "readyz_first_s": w.readyz_first,
    }
    return _section(s, raw), raw


def _readyz_line(raw: dict) -> str:
    first = raw["readyz_first_s"]
    return ", ".join(
        f"`{k}`: {raw['readyz_polls'][k]} (+{t:.2f})" for k, t in sorted(first.items(), key=lambda x: x[1])
    )


def _section(s: Stack, raw: dict) -> str:
    a = s.opts
    if raw["worker_pid"] is None:
        return (
            "## Ingestion worker killed\n\nNo ingestion worker child of the server was found (FALCONREC_INGEST_WORKER "
            f"off, or it did not start: the warm-up item servable: {raw['warm_servable']}); nothing was killed.\n"
        )
    rows = [
        ("POST of the items", str(raw["post_status"])),
        ("servable", f"{raw['servable']} of {a.kill_items}"),
        (
            "seconds after the kill: first / all servable",
            f"{fmt(raw['first_servable_s'], 2)} / {fmt(raw['all_servable_s'], 2)}",
        ),
        ("a new worker process seen after", f"{fmt(raw['new_worker_s'], 2)} s"),
        ("/readyz ok again, all servable: the poll at", f"+{fmt(raw['ready_ok_again_s'], 2)} s"),
        ("/readyz while waiting: polls (first seen, s after the kill)", _readyz_line(raw)),
    ]
    return (
        f"## Ingestion worker killed: {a.kill_items} items POSTed, the worker (pid {raw['worker_pid']}) SIGKILLed at "
        "once, no further POST\n\n" + table(rows)
    )
