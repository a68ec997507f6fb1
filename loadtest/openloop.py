"""Open-loop HTTP load: `POST /v1/recommend` leaves on a fixed schedule whatever the answers do.

Locust and httpx cost ~1 ms of client CPU per request, which caps a generator near 1,000 req/s per core and,
worse, delays sends when the client is busy (coordinated omission). This one writes pre-built requests on
keep-alive connections from one uvloop event loop and measures each latency from the request's *scheduled*
time, so a late send counts against the server-plus-client path instead of vanishing. Several processes
(`--procs`) split a rate.

    python -m loadtest.openloop --url http://127.0.0.1:8000 --rate 2000 --duration 10 --users 1,2,3 --out r.json

Prints one JSON summary line; `--out` also keeps every request's (status, latency ms, server ms, degraded).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from loadtest.procs import pct

MAX_CONNECTIONS = 512  # per process; a request finding none idle waits (and its latency shows it)
# A connection idle this long is closed, not reused: uvicorn closes keep-alive connections idle for 5 s, and a
# request written just as it does is lost (counted as "other", status 0: 4-27 a minute at 100-300 req/s).
IDLE_REUSE_S = 4.0


@dataclass
class Sample:
    status: int  # 0: no answer (connection error or client timeout)
    latency_ms: float  # from the scheduled send to the last byte of the answer
    server_ms: float  # the sum of the answer's Server-Timing stages (NaN when absent)
    degraded: bool
    stages: dict[str, float] = field(default_factory=dict)  # Server-Timing, per stage
    reasons: tuple[str, ...] = ()  # a degraded answer's degraded_reasons; a 503's detail


@dataclass
class Pool:
    host: str
    port: int
    idle: list = field(default_factory=list)
    opened: int = 0
    freed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def get(self):
        while self.idle:
            conn, last_used = self.idle.pop()
            if time.perf_counter() - last_used < IDLE_REUSE_S:
                return conn
            self.opened -= 1  # the server may close it any moment now: a request sent on it would be lost
            conn[1].close()
        if self.opened < MAX_CONNECTIONS:
            self.opened += 1
            try:
                return await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.opened -= 1
                raise
        async with self.freed:
            await self.freed.wait_for(lambda: bool(self.idle))
            return self.idle.pop()[0]  # just returned: fresh

    async def put(self, conn, ok: bool) -> None:
        if ok:
            self.idle.append((conn, time.perf_counter()))
        else:
            self.opened -= 1
            conn[1].close()
        async with self.freed:
            self.freed.notify()


def request_bytes(host: str, path: str, body: dict) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def server_timing(headers: list[bytes]) -> dict[str, float]:
    """`Server-Timing: queue;dur=0.02, user_tower;dur=1.7, ...` as {stage: ms}."""
    for h in headers:
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"server-timing":
            out = {}
            for part in value.split(b","):
                stage, _, dur = part.partition(b";dur=")
                out[stage.strip().decode()] = float(dur or 0)
            return out
    return {}


async def exchange(conn, req: bytes) -> tuple[int, list[bytes], bytes]:
    """One HTTP/1.1 request and its answer on a keep-alive connection (Content-Length framing, as uvicorn sends)."""
    reader, writer = conn
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = [h for h in lines[1:] if h]
    length = 0
    for h in headers:
        name, _, value = h.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return status, headers, body


async def one(pool: Pool, req: bytes, due: float, timeout_s: float, out: list[Sample]) -> None:
    status, headers, body, ok = 0, [], b"", False
    try:
        conn = await asyncio.wait_for(pool.get(), timeout_s)
        try:
            status, headers, body = await asyncio.wait_for(exchange(conn, req), timeout_s)
            ok = True
        finally:
            await pool.put(conn, ok)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
        pass
    latency = (time.perf_counter() - due) * 1000
    stages = server_timing(headers)
    total = sum(stages.values()) if stages else float("nan")
    degraded = b'"degraded":true' in body
    reasons = degraded_reasons(body) if degraded else refusal_detail(body) if status == 503 else ()
    out.append(Sample(status, latency, total, degraded, stages, reasons))


def degraded_reasons(body: bytes) -> tuple[str, ...]:
    try:
        return tuple(json.loads(body).get("degraded_reasons", ()))
    except (ValueError, AttributeError):
        return ()


def refusal_detail(body: bytes) -> tuple[str, ...]:
    """A refusal's reason, its `detail` (the guard's answers and the handlers' alike)."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return ()
    return (detail,) if isinstance(detail, str) else ()


@contextmanager
def no_gc_pauses() -> Iterator[None]:
    """The cyclic garbage collector off while a run sends, and what exists before it frozen: at 600 req/s its pauses
    held the generator's sends up to 104 ms behind schedule (two 20 s runs; 2.4-3.8 ms in three runs with it off),
    and the sends it then fired at once came back as a burst of 503s. Reference counting still frees the
    samples' garbage; the cycles wait for the collector after the run. What was frozen stays frozen (a server in the
    same process, as in the tests, froze its own objects at startup)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def run(
    url: str, rate: float, duration_s: float, requests: list[bytes], timeout_s: float = 2.0, seed: int = 0
) -> tuple[list[Sample], float]:
    """Send len(schedule) requests at `rate` (Poisson arrivals), cycling through `requests`; returns the samples
    and the seconds the sends fell behind their schedule at most (the generator's own lag). No GC pauses meanwhile."""
    with no_gc_pauses():
        return await _run(url, rate, duration_s, requests, timeout_s, seed)


async def _run(
    url: str, rate: float, duration_s: float, requests: list[bytes], timeout_s: float, seed: int
) -> tuple[list[Sample], float]:
    parts = urlsplit(url)
    pool = Pool(parts.hostname or "127.0.0.1", parts.port or 80)
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration_s))
    out: list[Sample] = []
    tasks = set()
    start = time.perf_counter() + 0.05
    lag = 0.0
    for i, due in enumerate(start + np.cumsum(gaps)):
        wait = due - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            lag = max(lag, -wait)
        t = asyncio.ensure_future(one(pool, requests[i % len(requests)], float(due), timeout_s, out))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    for (_, writer), _ in pool.idle:
        writer.close()
    return out, lag


def summarize(samples: list[Sample], seconds: float) -> dict:
    lat = np.array([s.latency_ms for s in samples if s.status == 200])
    srv = np.array([s.server_ms for s in samples if s.status == 200 and s.server_ms == s.server_ms])
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    n = len(samples)

    by_stage: dict[str, list[float]] = {}
    for s in samples:
        for k, v in s.stages.items():
            by_stage.setdefault(k, []).append(v)
    return {
        "stages_p50_p99_ms": {k: [pct(v, 50, 3), pct(v, 99, 3)] for k, v in by_stage.items()},
        "sent": n,
        "achieved_rate": round(n / seconds, 1) if seconds else None,
        "ok": int(len(lat)),
        "statuses": statuses,
        "p50_ms": pct(lat, 50, 3),
        "p99_ms": pct(lat, 99, 3),
        "max_ms": round(float(lat.max()), 3) if len(lat) else None,
        "server_p50_ms": pct(srv, 50, 3),
        "server_p99_ms": pct(srv, 99, 3),
        "degraded_share": round(sum(s.degraded for s in samples if s.status == 200) / max(len(lat), 1), 4),
    }


def build_requests(url: str, users: list[int], k: int, num_candidates: int | None) -> list[bytes]:
    host = urlsplit(url).netloc
    body: dict = {"k": k}
    if num_candidates:
        body["num_candidates"] = num_candidates
    return [request_bytes(host, "/v1/recommend", {"user_id": u, **body}) for u in users]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, required=True, help="requests per second (all processes together)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--users", required=True, help="comma-separated user ids, or @file with one per line")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--num-candidates", type=int, default=None)
    p.add_argument("--timeout", type=float, default=2.0, help="client timeout per request, seconds")
    p.add_argument("--procs", type=int, default=1, help="generator processes splitting the rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON: summary and every sample")
    a = p.parse_args(argv)
    if a.procs > 1:
        return _fan_out(a, argv if argv is not None else sys.argv[1:])
    raw = Path(a.users[1:]).read_text().split() if a.users.startswith("@") else a.users.split(",")
    users = [int(u) for u in raw]
    users = [users[i] for i in np.random.default_rng(a.seed).permutation(len(users))]
    reqs = build_requests(a.url, users, a.k, a.num_candidates)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    t = time.perf_counter()
    samples, lag = asyncio.run(run(a.url, a.rate, a.duration, reqs, a.timeout, a.seed))
    summary = summarize(samples, a.duration) | {"generator_lag_ms": round(lag * 1000, 2)}
    summary["wall_s"] = round(time.perf_counter() - t, 2)
    if a.out:
        a.out.write_text(json.dumps({"summary": summary, "samples": [s.__dict__ for s in samples]}))
    print(json.dumps(summary))
    return 0


def _fan_out(a: argparse.Namespace, argv: list[str]) -> int:
    """`--procs P`: P processes at rate/P each (different seeds), merged into one summary."""
    outs, procs = [], []
    for i in range(a.procs):
        out = Path(f"{a.out or 'openloop'}.{i}.json")
        outs.append(out)
        per = {"--rate": str(a.rate / a.procs), "--procs": "1", "--seed": str(a.seed + i), "--out": str(out)}
        args = _replace(argv, per)
        procs.append(subprocess.Popen([sys.executable, "-m", "loadtest.openloop", *args], stdout=subprocess.DEVNULL))
    for pr in procs:
        pr.wait()
    samples = []
    lag = 0.0
    for out in outs:
        d = json.loads(out.read_text())
        samples += [Sample(**s) for s in d["samples"]]
        lag = max(lag, d["summary"]["generator_lag_ms"])
        out.unlink()
    summary = summarize(samples, a.duration) | {"generator_lag_ms": lag, "procs": a.procs}
    if a.out:
        a.out.write_text(json.dumps({"summary": summary}))
    print(json.dumps(summary))
    return 0


def _replace(argv: list[str], values: dict[str, str]) -> list[str]:
    out = list(argv)
    for flag, value in values.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
