"""5. hugeids: one-item POST /v1/items with ids 2^21 - 1 ... 2^26 - 1, each waited for until servable, then a burst
of one-item POSTs with random ids up to 2^63 - 1 (issue 22, point 2: a dense id table sized by the largest id took
the API from 258 to 796 MB and copied it on every add). Measured: the server's RSS (VmRSS) before and after, and
the event loop's longest stall as a concurrent probe saw it. tests/test_catalog_ids.py makes the same climb."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np

from loadtest.hardening.stack import Stack
from loadtest.hardening.stats import counts, fmt, table
from loadtest.hardening.traffic import post_items, wait_servable
from loadtest.procs import pct, rss_bytes

WARM_ID = 2**20 - 1  # below the climb: starts the worker, and the first add's allocations happen before the baseline


@dataclass
class Probe:
    """GETs `path` back to back (a pause between) and keeps each latency under the label current at its start: a
    request that took long is a stretch when the server's event loop answered nothing."""

    path: str
    interval_s: float
    label: str = "idle"
    samples: dict[str, list[float]] = field(default_factory=dict)

    async def run(self, url: str, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        async with httpx.AsyncClient(base_url=url, timeout=60.0) as c:
            await c.get(self.path)  # connect first: the connection's setup is not a stall
            while not stop.is_set():
                label, t = self.label, loop.time()
                with contextlib.suppress(httpx.HTTPError):  # a failed probe counts by its time all the same
                    await c.get(self.path)
                self.samples.setdefault(label, []).append((loop.time() - t) * 1000)
                await asyncio.sleep(self.interval_s)

    def row(self, label: str) -> str:
        ms = self.samples.get(label, [])
        top = max(ms, default=None)
        return f"{len(ms)} probes, p50 {fmt(pct(ms, 50))} / p99 {fmt(pct(ms, 99))} / max {fmt(top)} ms"


async def _climb(c: httpx.AsyncClient, s: Stack, ids: list[int], codes: Counter) -> list[dict]:
    """One item at a time, each servable before the next (the issue's attack); RSS after each."""
    steps = []
    for item_id in ids:
        r = await post_items(c, s, [item_id])
        codes[r.status_code] += 1
        left = await wait_servable(c, [item_id], s.opts.item_wait_s) if r.status_code == 202 else {item_id}
        steps.append({"id": item_id, "status": r.status_code, "servable": not left, "rss": rss_bytes(s.server.pid)})
    return steps


async def _burst(c: httpx.AsyncClient, s: Stack, ids: list[int], codes: Counter) -> set[int]:
    """All the one-item POSTs at once (--huge-concurrency in flight), then wait until they are servable."""
    gate = asyncio.Semaphore(s.opts.huge_concurrency)

    async def one(item_id: int) -> int:
        async with gate:
            try:
                return (await post_items(c, s, [item_id])).status_code
            except httpx.HTTPError:
                return 0

    statuses = await asyncio.gather(*(one(i) for i in ids))
    codes.update(statuses)
    accepted = [i for i, st in zip(ids, statuses, strict=True) if st == 202]
    refused = set(ids) - set(accepted)
    return refused | await wait_servable(c, accepted, s.opts.item_wait_s)


def burst_ids(s: Stack) -> list[int]:
    rng = np.random.default_rng(s.opts.seed + 6)
    return sorted({int(x) for x in rng.integers(2**32, 2**63 - 1, s.opts.huge_burst, dtype=np.int64)})


async def loop_lag(c: httpx.AsyncClient) -> dict[str, float]:
    """The server's own event-loop lag so far (service/loop_lag.py): timers run late by > 10 ms and > 50 ms, and the
    longest lag since start. Unlike the probe, no other process's CPU share is in it except through this one's."""
    text = (await c.get("/metrics")).text
    got: dict[str, float] = {}
    for line in text.splitlines():
        for key, name in (
            ("le10", 'falconrec_event_loop_lag_seconds_bucket{le="0.01"}'),
            ("le50", 'falconrec_event_loop_lag_seconds_bucket{le="0.05"}'),
            ("count", "falconrec_event_loop_lag_seconds_count"),
            ("max", "falconrec_event_loop_lag_max_seconds"),
        ):
            if line.startswith(name + " "):
                got[key] = float(line.rsplit(" ", 1)[1])
    return {"over10": got["count"] - got["le10"], "over50": got["count"] - got["le50"], "max_ms": 1000 * got["max"]}


def _lag_delta(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"over10": b["over10"] - a["over10"], "over50": b["over50"] - a["over50"], "max_ms_since_start": b["max_ms"]}


async def measure(s: Stack) -> tuple[str, dict]:
    a = s.opts
    climb_ids = [2**k - 1 for k in range(a.huge_from, a.huge_to + 1)]
    probe = Probe(a.probe_path, a.probe_interval_ms / 1000)
    stop = asyncio.Event()
    codes: Counter = Counter()
    async with httpx.AsyncClient(base_url=s.http_url, timeout=60.0) as c:
        await post_items(c, s, [WARM_ID])
        warm_left = await wait_servable(c, [WARM_ID], a.item_wait_s)
        probing = asyncio.create_task(probe.run(s.http_url, stop))
        try:
            await asyncio.sleep(2.0)  # the probe's baseline, nothing posted
            rss0, lag0 = rss_bytes(s.server.pid), await loop_lag(c)
            probe.label = "climb"
            steps = await _climb(c, s, climb_ids, codes)
            rss_climb, lag1 = rss_bytes(s.server.pid), await loop_lag(c)
            probe.label = "burst"
            ids = burst_ids(s)
            burst_left = await _burst(c, s, ids, codes)
            rss1, lag2 = rss_bytes(s.server.pid), await loop_lag(c)
        finally:
            stop.set()
            await probing
    raw = {
        "rss_before": rss0,
        "rss_after_climb": rss_climb,
        "rss_after": rss1,
        "rss_delta": rss1 - rss0,
        "warm_servable": not warm_left,
        "climb": steps,
        "burst": {"n": len(ids), "not_servable": len(burst_left)},
        "post_statuses": {str(k): v for k, v in codes.items()},
        "probe_ms": {
            k: {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99), "max": max(v)} for k, v in probe.samples.items()
        },
        "longest_stall_ms": max((max(v) for k, v in probe.samples.items() if k != "idle"), default=None),
        "loop_lag": {"climb": _lag_delta(lag0, lag1), "burst": _lag_delta(lag1, lag2)},
    }
    return _section(s, probe, raw), raw


def _section(s: Stack, probe: Probe, raw: dict) -> str:
    a = s.opts
    mib = 2**20
    climb = " → ".join(f"{x['rss'] / mib:.0f}" for x in raw["climb"])
    rows = [
        (
            "server RSS before / after the climb / after the burst",
            f"{raw['rss_before'] / mib:.1f} / {raw['rss_after_climb'] / mib:.1f} / {raw['rss_after'] / mib:.1f} MiB",
        ),
        ("RSS delta (whole part)", f"{raw['rss_delta'] / mib:+.1f} MiB"),
        ("RSS after each climb step, MiB", climb),
        ("climb ids servable", f"{sum(x['servable'] for x in raw['climb'])} of {len(raw['climb'])}"),
        ("burst ids servable", f"{raw['burst']['n'] - raw['burst']['not_servable']} of {raw['burst']['n']}"),
        ("POST /v1/items answers", counts(raw["post_statuses"])),
        ("longest stall (probe max while posting)", f"{fmt(raw['longest_stall_ms'])} ms"),
        *((f"probe `GET {a.probe_path}`: {label}", probe.row(label)) for label in ("idle", "climb", "burst")),
        *(
            (
                f"server's event-loop lag: {phase}",
                f"{lag['over10']:.0f} timers late > 10 ms, {lag['over50']:.0f} > 50 ms "
                f"(longest since start {lag['max_ms_since_start']:.1f} ms)",
            )
            for phase, lag in raw["loop_lag"].items()
        ),
    ]
    return (
        f"## Huge item ids: one-item POST /v1/items with ids 2^{a.huge_from} - 1 … 2^{a.huge_to} - 1, then a burst "
        f"of {a.huge_burst} random ids < 2^63 ({a.huge_concurrency} in flight)\n\n" + table(rows)
    )
