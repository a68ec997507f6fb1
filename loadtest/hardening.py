"""Hardening measurements against a real `falconrec serve` subprocess (not a test: it prints numbers).

    python -m loadtest.hardening --config ml1m [--artifacts artifacts] [--repo model_repository] [--out DIR]

It starts a private redis-server on a free loopback port, loads it with `falconrec load-redis`, starts
`falconrec serve` on that Redis, and measures three things, each beside a fixed-rate Poisson stream of
POST /v1/recommend for known users (the build's `user_raw_ids`, Zipf-skewed like loadtest/locustfile.py):

1. outage: healthy, Redis SIGKILLed for --outage-s, restarted and reloaded, then after; answers per phase by
   status (200 degraded or not, 404, 503 and whether each 503 had Retry-After, other, client errors), each
   request counted in the phase of its arrival;
2. grpc: one ScoreBatch of --batch-users x --batch-items under a client deadline while HTTP runs, then a second
   one cancelled by a short client timeout and the server's CPU time (/proc/PID/stat) in the window after it;
3. overload: open-loop arrivals well above capacity (--overload-rate): shares, latencies, degraded share.

The markdown goes to stdout and DIR/hardening.md, the raw numbers to DIR/hardening.json, the server's and the
loader's output to DIR/server.log and DIR/load-redis.log. Every process it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np

from service.artifacts import ArtifactPaths
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg

LOOPBACK = "127.0.0.1"
PARTS = ("outage", "grpc", "overload")


# --- processes ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM the process group started with start_new_session=True, SIGKILL it after `grace_s`."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a frozen process does not act on SIGTERM
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


class Redis:
    """A private redis-server (nothing saved) on a fixed loopback port, killed and restarted at will."""

    def __init__(self, port: int):
        self.port = port
        self.url = f"redis://{LOOPBACK}:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed")
        args = [exe, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(200):
            if self.ping():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the data is gone with it (nothing is saved)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


@dataclass
class Setup:
    """What the measurements need to reach the server and restore Redis."""

    args: argparse.Namespace
    out: Path
    redis: Redis
    http_url: str
    grpc_target: str
    server: subprocess.Popen
    users: np.ndarray
    weights: np.ndarray
    items: np.ndarray
    env: dict[str, str]


def service_env(args: argparse.Namespace, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCONREC_")}
    env.update(
        {
            "FALCONREC_REDIS_URL": redis_url,  # the environment, not argv (the loader reads it too)
            "FALCONREC_BUDGET_MS": str(args.budget_ms),
            "FALCONREC_HOST": LOOPBACK,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    for pair in args.server_env:
        key, _, value = pair.partition("=")
        if not key.startswith("FALCONREC_"):
            raise SystemExit(f"--server-env takes FALCONREC_*=value, not {pair!r}")
        env[key] = value
    return env


def load_redis(args: argparse.Namespace, env: dict[str, str], log: Path) -> float:
    """`falconrec load-redis` into the private Redis; returns its seconds."""
    t = time.monotonic()
    cmd = [sys.executable, "-m", "falconrec.cli", "load-redis", "--config", args.config]
    cmd += ["--artifacts", str(args.artifacts), "--repo", str(args.repo)]
    with open(log, "a") as f:
        f.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.load_timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            raise RuntimeError(f"load-redis ran over {args.load_timeout_s} s (see {log})") from None
        finally:
            stop_group(proc)
    if rc != 0:
        raise RuntimeError(f"load-redis failed with {rc} (see {log})")
    return time.monotonic() - t


def start_server(args: argparse.Namespace, env: dict[str, str], port: int, grpc_port: int, log: Path):
    cmd = [sys.executable, "-m", "falconrec.cli", "serve", "--config", args.config, "--host", LOOPBACK]
    cmd += ["--port", str(port), "--grpc-port", str(grpc_port)]
    cmd += ["--artifacts", str(args.artifacts), "--repo", str(args.repo)]
    f = open(log, "a")  # noqa: SIM115 - the child keeps writing to it; closed by the OS at exit
    f.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
    f.flush()
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Poll /readyz until status ok; returns the seconds it took."""
    t = time.monotonic()
    with httpx.Client(base_url=url, timeout=2.0) as c:
        while time.monotonic() - t < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} (see server.log)")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = c.get("/readyz")
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return time.monotonic() - t
            time.sleep(0.25)
    raise RuntimeError(f"the server was not ready within {timeout_s} s (see server.log)")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_log_findings(log: Path) -> Counter:
    """Tracebacks and error/warning lines in the server's output."""
    found: Counter = Counter()
    if not log.exists():
        return found
    for line in log.read_text(errors="replace").splitlines():
        if "Traceback" in line:
            found["Traceback"] += 1
        elif " ERROR " in line or line.startswith("ERROR"):
            found["ERROR: " + line.split("ERROR", 1)[1].strip()[:100]] += 1
        elif " WARNING " in line or line.startswith("WARNING"):
            found["WARNING: " + line.split("WARNING", 1)[1].strip()[:100]] += 1
    return found


# --- HTTP load ------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One POST /v1/recommend as the client saw it (status 0: no HTTP answer)."""

    phase: str
    t: float  # intended arrival, on the event loop's clock
    lag_ms: float  # how late the client sent it
    status: int
    latency_ms: float  # from the intended arrival (queueing in the client counts)
    degraded: bool = False
    server_ms: float | None = None
    retry_after: bool = False
    detail: str = ""
    reasons: tuple[str, ...] = ()  # degraded_reasons of a 200

    @property
    def store_degraded(self) -> bool:
        """Degraded because of the store (not the budget): the outage's own kind of answer."""
        return any("store" in r or "redis" in r.lower() for r in self.reasons)


class Stream:
    """Open-loop Poisson arrivals of POST /v1/recommend; each request is its own task (arrivals never wait)."""

    def __init__(self, setup: Setup, rate: float, seed: int, connections: int = 32):
        self.s = setup
        self.rate = rate
        self.rng = np.random.default_rng(seed)
        self.connections = connections
        self.answers: list[Answer] = []

    async def run(self, phase: Callable[[], str], stop: asyncio.Event, max_s: float) -> list[Answer]:
        limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
        timeout = httpx.Timeout(self.s.args.request_timeout_s)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        async with httpx.AsyncClient(base_url=self.s.http_url, limits=limits, timeout=timeout) as client:
            with contextlib.suppress(httpx.HTTPError):  # the client's first request imports and connects: not timed
                await client.get("/healthz")
            t0 = loop.time()
            due = t0
            while not stop.is_set() and due - t0 < max_s:
                due += float(self.rng.exponential(1.0 / self.rate))
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if stop.is_set():
                    break
                uid = int(self.rng.choice(self.s.users, p=self.s.weights))
                task = asyncio.create_task(self._one(client, phase(), due, uid))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=self.s.args.request_timeout_s + 5)
        return self.answers

    async def _one(self, client: httpx.AsyncClient, phase: str, due: float, uid: int) -> None:
        loop = asyncio.get_running_loop()
        lag = (loop.time() - due) * 1000
        try:
            r = await client.post("/v1/recommend", json={"user_id": uid, "k": self.s.args.k})
        except httpx.HTTPError as e:
            ms = (loop.time() - due) * 1000
            self.answers.append(Answer(phase, due, lag, 0, ms, detail=type(e).__name__))
            return
        ms = (loop.time() - due) * 1000
        a = Answer(phase, due, lag, r.status_code, ms, retry_after="retry-after" in r.headers)
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 200:
            a.degraded = bool(body.get("degraded"))
            a.server_ms = float(sum(body.get("timings_ms", {}).values()))
            a.reasons = tuple(str(r)[:120] for r in body.get("degraded_reasons") or ())
        else:
            a.detail = str(body.get("detail", r.text))[:120]
        self.answers.append(a)


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _numbers_out(text: str) -> str:
    """N for every number, so that the same reason adds up ("3 requests queued ahead" -> "N requests ...")."""
    return re.sub(r"\d+(\.\d+)?", "N", text)


@dataclass
class PhaseStats:
    """Answers of one phase, counted and summarised."""

    phase: str
    seconds: float
    n: int = 0
    ok: int = 0
    degraded: int = 0
    store_degraded: int = 0
    not_found: int = 0
    unavailable: int = 0
    no_retry_after: int = 0
    other: Counter = field(default_factory=Counter)
    client_errors: Counter = field(default_factory=Counter)
    p50_200: float | None = None
    p99_200: float | None = None
    p50_503: float | None = None
    p99_503: float | None = None
    server_p99: float | None = None
    lag_p99: float | None = None
    details: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, phase: str, seconds: float, answers: list[Answer]) -> PhaseStats:
        mine = [a for a in answers if a.phase == phase]
        st = cls(phase, seconds, n=len(mine))
        for a in mine:
            if a.status == 200:
                st.degraded += a.degraded
                st.store_degraded += a.store_degraded
                st.ok += not a.degraded
            elif a.status == 404:
                st.not_found += 1
            elif a.status == 503:
                st.unavailable += 1
                st.no_retry_after += not a.retry_after
            elif a.status == 0:
                st.client_errors[a.detail] += 1
            else:
                st.other[a.status] += 1
            if a.status not in (0, 200):
                st.details[f"{a.status} {_numbers_out(a.detail)}"] += 1
            for r in a.reasons:
                st.details["200 degraded: " + _numbers_out(r)] += 1
        lat200 = [a.latency_ms for a in mine if a.status == 200]
        lat503 = [a.latency_ms for a in mine if a.status == 503]
        st.p50_200, st.p99_200 = pct(lat200, 50), pct(lat200, 99)
        st.p50_503, st.p99_503 = pct(lat503, 50), pct(lat503, 99)
        st.server_p99 = pct([a.server_ms for a in mine if a.server_ms is not None], 99)
        st.lag_p99 = pct([a.lag_ms for a in mine], 99)
        return st

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("other", "client_errors", "details"):
            d[k] = {str(key): v for key, v in d[k].items()}
        return d


def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def share(part: int, n: int) -> str:
    return f"{part} ({100 * part / n:.1f} %)" if n else "0"


def counts(c: Counter | dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "0"


PHASE_HEADER = (
    "| phase | s | requests | 200 | 200 degraded (by the store) | 404 | 503 | 503 w/o Retry-After | other "
    "| client errors | 200 p50 / p99 ms | 503 p50 / p99 ms | server p99 ms | client lag p99 ms |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def phase_row(st: PhaseStats) -> str:
    return (
        f"| {st.phase} | {st.seconds:.1f} | {st.n} | {share(st.ok, st.n)} "
        f"| {share(st.degraded, st.n)}, store {st.store_degraded} "
        f"| {share(st.not_found, st.n)} | {share(st.unavailable, st.n)} | {st.no_retry_after} "
        f"| {counts(st.other)} | {counts(st.client_errors)} | {fmt(st.p50_200)} / {fmt(st.p99_200)} "
        f"| {fmt(st.p50_503)} / {fmt(st.p99_503)} | {fmt(st.server_p99)} | {fmt(st.lag_p99)} |\n"
    )


def details_lines(stats: list[PhaseStats]) -> str:
    lines = ""
    for st in stats:
        for text, n in st.details.most_common(6):
            lines += f"- {st.phase}: {n} × `{text}`\n"
    return lines


# --- 1. Redis outage ------------------------------------------------------------------------------------
async def measure_outage(s: Setup) -> tuple[str, dict]:
    a = s.args
    phase = ["healthy"]
    marks: dict[str, float] = {}
    stop = asyncio.Event()
    stream = Stream(s, a.rate, a.seed + 1)
    budget = a.healthy_s + a.outage_s + a.load_timeout_s + a.after_s + 60
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    load = asyncio.create_task(stream.run(lambda: phase[0], stop, budget))
    ready_after: float | None = None
    try:
        await asyncio.sleep(a.healthy_s)
        marks["kill"] = loop.time() - t0
        s.redis.kill()
        phase[0] = "outage"
        await asyncio.sleep(a.outage_s)
        marks["restart"] = loop.time() - t0
        phase[0] = "reload"
        await asyncio.to_thread(s.redis.start)
        marks["load_redis_s"] = await asyncio.to_thread(load_redis, a, s.env, s.out / "load-redis.log")
        marks["after"] = loop.time() - t0
        phase[0] = "after"
        async with httpx.AsyncClient(base_url=s.http_url, timeout=2.0) as c:
            end = loop.time() + a.after_s
            while loop.time() < end:
                if ready_after is None:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        if (await c.get("/readyz")).json().get("status") == "ok":
                            ready_after = loop.time() - t0 - marks["after"]
                await asyncio.sleep(0.25)
    finally:
        stop.set()
        answers = await load
    seconds = {
        "healthy": marks.get("kill", 0.0),
        "outage": marks.get("restart", 0.0) - marks.get("kill", 0.0),
        "reload": marks.get("after", 0.0) - marks.get("restart", 0.0),
        "after": float(a.after_s),
    }
    stats = [PhaseStats.of(p, seconds[p], answers) for p in ("healthy", "outage", "reload", "after")]
    after = [x for x in answers if x.phase == "after"]
    not_clean = [x.t - t0 - marks["after"] for x in after if x.status != 200 or x.store_degraded]
    last = f"+{max(not_clean):.2f} s" if not_clean else "none"
    first_503 = [x.t - t0 - marks["kill"] for x in answers if x.phase == "outage" and x.status == 503]
    md = (
        f"## 1. Redis outage: SIGKILL for {a.outage_s:g} s, restart, `load-redis`, then {a.after_s:g} s\n\n"
        f"POST /v1/recommend for known users at {a.rate:g} req/s (Poisson), server budget {a.budget_ms:g} ms.\n\n"
        + PHASE_HEADER
        + "".join(phase_row(st) for st in stats)
        + "\n"
        f"- `load-redis` after the restart took {marks['load_redis_s']:.1f} s; /readyz said ok "
        f"{fmt(ready_after, 2)} s after it finished.\n"
        f"- first 503 {fmt(min(first_503) if first_503 else None, 2)} s after the kill; last answer "
        f"that was not a 200 or was degraded by the store, in 'after': {last}.\n" + details_lines(stats)
    )
    raw = {"marks": marks, "ready_after_s": ready_after, "phases": [st.as_dict() for st in stats]}
    return md, raw


# --- 2. gRPC ScoreBatch --------------------------------------------------------------------------------
@dataclass
class BatchResult:
    codes: Counter
    received: int
    rpc_status: str
    seconds: float
    cpu_s: float


def score_batch(s: Setup, req: pb.ScoreBatchRequest, timeout_s: float) -> BatchResult:
    """One ScoreBatch, results counted by error_code ('OK' for none); the server's CPU seconds meanwhile."""
    codes: Counter = Counter()
    status = "OK"
    cpu0, t = cpu_seconds(s.server.pid), time.monotonic()
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(s.grpc_target, options=opts) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        try:
            for r in pbg.RecommenderStub(ch).ScoreBatch(req, timeout=timeout_s):
                codes[r.error_code or "OK"] += 1
        except grpc.RpcError as e:
            status = e.code().name
    return BatchResult(codes, sum(codes.values()), status, time.monotonic() - t, cpu_seconds(s.server.pid) - cpu0)


def batch_request(s: Setup, n_users: int, n_items: int) -> pb.ScoreBatchRequest:
    rng = np.random.default_rng(s.args.seed + 2)
    uids = rng.choice(s.users, size=n_users, p=s.weights)
    items = np.resize(s.items, n_items).tolist()  # cycles the catalog when it is smaller than n_items
    users = [pb.ScoreUser(request_id=str(i), user_id=int(u), item_ids=items) for i, u in enumerate(uids)]
    return pb.ScoreBatchRequest(users=users, budget_ms=s.args.batch_budget_ms)


async def sample_cpu(pid: int, seconds: float, step: float) -> list[tuple[float, float]]:
    """(seconds since start, cumulative CPU seconds) every `step` for `seconds`."""
    loop = asyncio.get_running_loop()
    t0, c0 = loop.time(), cpu_seconds(pid)
    out = [(0.0, 0.0)]
    for i in range(1, int(round(seconds / step)) + 1):
        await asyncio.sleep(max(0.0, t0 + i * step - loop.time()))
        out.append((loop.time() - t0, cpu_seconds(pid) - c0))
    return out


async def measure_grpc(s: Setup) -> tuple[str, dict]:
    a = s.args
    req = batch_request(s, a.batch_users, a.batch_items)
    phase = ["batch"]
    stop = asyncio.Event()
    stream = Stream(s, a.rate, a.seed + 3)
    load = asyncio.create_task(stream.run(lambda: phase[0], stop, a.batch_deadline_s + 60))
    try:
        wide = await asyncio.to_thread(score_batch, s, req, a.batch_deadline_s)
    finally:
        stop.set()
        answers = await load
    http = PhaseStats.of("batch", wide.seconds, answers)

    # A second batch, cancelled by its client's timeout, with no HTTP load: the server's CPU afterwards.
    creq = req if a.cancel_users == a.batch_users else batch_request(s, a.cancel_users, a.batch_items)
    idle = await sample_cpu(s.server.pid, a.idle_s, a.cpu_step_s)
    idle_cores = idle[-1][1] / max(idle[-1][0], 1e-9)
    cancelled = await asyncio.to_thread(score_batch, s, creq, a.cancel_after_s)
    after = await sample_cpu(s.server.pid, a.cpu_window_s, a.cpu_step_s)
    slices = [(t1, (c1 - c0) / (t1 - t0)) for (t0, c0), (t1, c1) in zip(after, after[1:], strict=False)]
    busy = [t for t, cores in slices if cores > a.busy_cores]
    md = (
        f"## 2. gRPC ScoreBatch: {a.batch_users} users × {a.batch_items} items, deadline {a.batch_deadline_s:g} s\n\n"
        "| | value |\n|---|---|\n"
        f"| request | {req.ByteSize() / 2**20:.2f} MiB, budget per user "
        f"{a.batch_budget_ms or a.budget_ms:g} ms{'' if a.batch_budget_ms else ' (service default)'} |\n"
        f"| client status | {wide.rpc_status} after {wide.seconds:.2f} s |\n"
        f"| results received | {wide.received} of {a.batch_users} ({wide.received / max(wide.seconds, 1e-9):.0f}/s) |\n"
        f"| per-user codes | {counts(wide.codes)} |\n"
        f"| server CPU during the batch | {wide.cpu_s:.2f} s ({wide.cpu_s / max(wide.seconds, 1e-9):.2f} cores) |\n"
        f"| cancelled batch | {a.cancel_users} users, client timeout {a.cancel_after_s:g} s: "
        f"{cancelled.rpc_status}, {cancelled.received} results, {counts(cancelled.codes)} |\n"
        f"| server CPU in the {a.cpu_window_s:g} s after the cancel | {after[-1][1]:.2f} s "
        f"(idle baseline {idle_cores:.3f} cores × {a.cpu_window_s:g} s = {idle_cores * a.cpu_window_s:.2f} s) |\n"
        f"| last {a.cpu_step_s:g} s slice above {a.busy_cores:g} cores after the cancel | "
        f"{'none' if not busy else f'ends at +{max(busy):.1f} s'} |\n"
        f"| cores per slice after the cancel | {' '.join(f'{c:.2f}' for _, c in slices)} |\n\n"
        f"HTTP /v1/recommend at {a.rate:g} req/s during the wide batch:\n\n"
        + PHASE_HEADER
        + phase_row(http)
        + "\n"
        + details_lines([http])
    )
    if cancelled.rpc_status == "OK":
        md += "- the second batch finished before its client timeout: nothing was cancelled (raise --cancel-users)\n"
    raw = {
        "request_bytes": req.ByteSize(),
        "wide": {**wide.__dict__, "codes": dict(wide.codes)},
        "cancelled": {**cancelled.__dict__, "codes": dict(cancelled.codes)},
        "idle_cores": idle_cores,
        "cpu_after_cancel": after,
        "http": http.as_dict(),
    }
    return md, raw


# --- 3. overload ----------------------------------------------------------------------------------------
async def measure_overload(s: Setup) -> tuple[str, dict]:
    a = s.args
    stop = asyncio.Event()
    stream = Stream(s, a.overload_rate, a.seed + 4, connections=a.overload_connections)
    t, server_cpu, own_cpu = time.monotonic(), cpu_seconds(s.server.pid), time.process_time()
    answers = await stream.run(lambda: "overload", stop, a.overload_s)
    wall = time.monotonic() - t
    server_cores = (cpu_seconds(s.server.pid) - server_cpu) / wall
    own_cores = (time.process_time() - own_cpu) / wall
    st = PhaseStats.of("overload", a.overload_s, answers)
    n = max(st.n, 1)
    served = st.ok + st.degraded
    others = sum(st.other.values()) + sum(st.client_errors.values()) + st.not_found
    md = (
        f"## 3. Overload: {a.overload_rate:g} req/s open loop for {a.overload_s:g} s "
        f"(≤ {a.overload_connections} connections), server budget {a.budget_ms:g} ms\n\n"
        "| | value |\n|---|---|\n"
        f"| arrivals | {st.n} ({st.n / a.overload_s:.1f}/s; last answer after {wall:.1f} s) |\n"
        f"| 200 | {100 * served / n:.1f} % ({served / a.overload_s:.1f}/s), of them degraded "
        f"{100 * st.degraded / max(served, 1):.1f} % |\n"
        f"| 503 | {100 * st.unavailable / n:.1f} % ({st.no_retry_after} without Retry-After) |\n"
        f"| other | {100 * others / n:.1f} % (404: {st.not_found}; {counts(st.other)}; "
        f"client: {counts(st.client_errors)}) |\n"
        f"| 200 latency p50 / p99 (client) | {fmt(st.p50_200)} / {fmt(st.p99_200)} ms |\n"
        f"| 503 latency p50 / p99 (client) | {fmt(st.p50_503)} / {fmt(st.p99_503)} ms |\n"
        f"| server's own time of the 200s (sum of timings_ms) p99 | {fmt(st.server_p99)} ms |\n"
        f"| client lag p99 (arrival sent late) | {fmt(st.lag_p99)} ms |\n"
        f"| CPU: server / this load generator | {server_cores:.2f} / {own_cores:.2f} cores |\n\n" + details_lines([st])
    )
    return md, {"wall_s": wall, "server_cores": server_cores, "client_cores": own_cores, **st.as_dict()}


# --- main -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.hardening", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--config", default="ml1m", help="build config (tiny, ml1m, ...)")
    add("--artifacts", type=Path, default=Path("artifacts"))
    add("--repo", type=Path, default=Path("model_repository"))
    add("--out", type=Path, default=Path("loadtest/results/hardening"))
    add("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    add("--rate", type=float, default=20.0, help="background HTTP rate, req/s (Poisson)")
    add("--k", type=int, default=10)
    add("--zipf", type=float, default=1.07, help="user skew (0: uniform), as loadtest/locustfile.py")
    add("--seed", type=int, default=0)
    add("--budget-ms", type=float, default=20.0, help="FALCONREC_BUDGET_MS of the server")
    add("--server-env", action="append", default=[], metavar="FALCONREC_X=V", help="more server settings")
    add("--request-timeout-s", type=float, default=10.0, help="HTTP client timeout")
    add("--warmup", type=int, default=50, help="sequential requests before measuring")
    add("--startup-timeout-s", type=float, default=600.0)
    add("--load-timeout-s", type=float, default=600.0, help="limit for one load-redis")
    g = p.add_argument_group("1. outage")
    g.add_argument("--healthy-s", type=float, default=10.0)
    g.add_argument("--outage-s", type=float, default=90.0)
    g.add_argument("--after-s", type=float, default=20.0)
    g = p.add_argument_group("2. grpc")
    g.add_argument("--batch-users", type=int, default=1000)
    g.add_argument("--batch-items", type=int, default=1000)
    g.add_argument("--batch-deadline-s", type=float, default=30.0)
    g.add_argument("--batch-budget-ms", type=float, default=0.0, help="per user; 0: the service default")
    g.add_argument("--cancel-users", type=int, default=None, help="users of the cancelled batch (default: same)")
    g.add_argument("--cancel-after-s", type=float, default=2.0, help="client timeout of the cancelled batch")
    g.add_argument("--cpu-window-s", type=float, default=10.0)
    g.add_argument("--cpu-step-s", type=float, default=0.5)
    g.add_argument("--idle-s", type=float, default=3.0, help="idle CPU baseline before the cancelled batch")
    g.add_argument("--busy-cores", type=float, default=0.1, help="a slice above this counts as busy")
    g = p.add_argument_group("3. overload")
    g.add_argument("--overload-rate", type=float, default=200.0)
    g.add_argument("--overload-s", type=float, default=30.0)
    g.add_argument("--overload-connections", type=int, default=200)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if unknown := set(args.parts) - set(PARTS):
        p.error(f"unknown parts: {sorted(unknown)}")
    if args.cancel_users is None:
        args.cancel_users = args.batch_users
    return args


def users_of(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, most active first; their draw weights; item ids) from the build's data."""
    z = np.load(ArtifactPaths.for_config(args.config, args.artifacts).data, allow_pickle=False)
    order = np.argsort(-z["lengths"], kind="stable")
    users = z["user_raw_ids"][order].astype(np.int64)
    w = 1.0 / np.arange(1, len(users) + 1) ** args.zipf
    return users, w / w.sum(), z["item_raw_ids"].astype(np.int64)


def warm_up(url: str, users: np.ndarray, n: int) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for i in range(n):
            c.post("/v1/recommend", json={"user_id": int(users[i % len(users)])})


async def measure(s: Setup) -> tuple[list[str], dict]:
    sections, raw = [], {}
    runners = {"outage": measure_outage, "grpc": measure_grpc, "overload": measure_overload}
    for part in s.args.parts:
        print(f"[hardening] {part} ...", file=sys.stderr, flush=True)
        md, raw[part] = await runners[part](s)
        sections.append(md)
    return sections, raw


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("server.log", "load-redis.log"):
        (args.out / name).unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, _terminate)
    users, weights, items = users_of(args)
    redis = Redis(free_port())
    server: subprocess.Popen | None = None
    try:
        redis.start()
        env = service_env(args, redis.url)
        loaded_s = load_redis(args, env, args.out / "load-redis.log")
        port, grpc_port = free_port(), free_port()
        server = start_server(args, env, port, grpc_port, args.out / "server.log")
        url = f"http://{LOOPBACK}:{port}"
        ready_s = wait_ready(url, server, args.startup_timeout_s)
        warm_up(url, users, args.warmup)
        s = Setup(args, args.out, redis, url, f"{LOOPBACK}:{grpc_port}", server, users, weights, items, env)
        sections, raw = asyncio.run(measure(s))
        if server.poll() is not None:
            sections.append(f"**The server exited with {server.returncode} during the run.**\n")
    finally:
        stop_group(server)
        redis.kill()
    findings = server_log_findings(args.out / "server.log")
    head = (
        f"# falconrec hardening: {args.config}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"`{' '.join(['python -m loadtest.hardening', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
        f"{len(users)} users (Zipf {args.zipf:g}), {len(items)} items; first `load-redis` {loaded_s:.1f} s, "
        f"server ready {ready_s:.1f} s after start, {args.warmup} warm-up requests; {os.cpu_count()} CPUs.\n\n"
    )
    tail = "## Server log\n\n" + (
        "".join(f"- {n} × `{line}`\n" for line, n in findings.most_common(15)) or "- no warnings or errors\n"
    )
    md = head + "\n".join(sections) + "\n" + tail
    print(md)
    (args.out / "hardening.md").write_text(md)
    raw["log_findings"] = dict(findings)
    (args.out / "hardening.json").write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the processes are stopped by main's finally by now
        print("[hardening] interrupted; redis-server and the server are stopped", file=sys.stderr)
        sys.exit(130)
