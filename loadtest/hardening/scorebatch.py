"""2. grpc: one wide ScoreBatch under a client deadline while HTTP runs, then a second one cancelled by a short client
timeout, and the server's CPU time (/proc/PID/stat) in the window after it: a cancelled batch must stop costing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np

from loadtest.hardening.stack import Stack
from loadtest.hardening.stats import PhaseStats, counts, phase_table, table
from loadtest.hardening.traffic import Stream
from loadtest.procs import cpu_seconds
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg


@dataclass
class BatchResult:
    codes: Counter
    received: int
    rpc_status: str
    seconds: float
    cpu_s: float


def score_batch(s: Stack, req: pb.ScoreBatchRequest, timeout_s: float) -> BatchResult:
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


def batch_request(s: Stack, n_users: int, n_items: int) -> pb.ScoreBatchRequest:
    rng = np.random.default_rng(s.opts.seed + 2)
    uids = rng.choice(s.users, size=n_users, p=s.weights)
    items = np.resize(s.items, n_items).tolist()  # cycles the catalog when it is smaller than n_items
    users = [pb.ScoreUser(request_id=str(i), user_id=int(u), item_ids=items) for i, u in enumerate(uids)]
    return pb.ScoreBatchRequest(users=users, budget_ms=s.opts.batch_budget_ms)


async def sample_cpu(pid: int, seconds: float, step: float) -> list[tuple[float, float]]:
    """(seconds since start, cumulative CPU seconds) every `step` for `seconds`."""
    loop = asyncio.get_running_loop()
    t0, c0 = loop.time(), cpu_seconds(pid)
    out = [(0.0, 0.0)]
    for i in range(1, int(round(seconds / step)) + 1):
        await asyncio.sleep(max(0.0, t0 + i * step - loop.time()))
        out.append((loop.time() - t0, cpu_seconds(pid) - c0))
    return out


async def measure(s: Stack) -> tuple[str, dict]:
    a = s.opts
    req = batch_request(s, a.batch_users, a.batch_items)
    stop = asyncio.Event()
    load = asyncio.create_task(Stream(s, a.rate, a.seed + 3).run(lambda: "batch", stop, a.batch_deadline_s + 60))
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
    md = _section(s, req, wide, cancelled, idle_cores, after) + phase_table([http])
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


def _section(s: Stack, req, wide: BatchResult, cancelled: BatchResult, idle_cores: float, after: list) -> str:
    a = s.opts
    slices = [(t1, (c1 - c0) / (t1 - t0)) for (t0, c0), (t1, c1) in zip(after, after[1:], strict=False)]
    busy = [t for t, cores in slices if cores > a.busy_cores]
    budget = f"{a.batch_budget_ms or a.budget_ms:g} ms{'' if a.batch_budget_ms else ' (service default)'}"
    rows = [
        ("request", f"{req.ByteSize() / 2**20:.2f} MiB, budget per user {budget}"),
        ("client status", f"{wide.rpc_status} after {wide.seconds:.2f} s"),
        ("results received", f"{wide.received} of {a.batch_users} ({wide.received / max(wide.seconds, 1e-9):.0f}/s)"),
        ("per-user codes", counts(wide.codes)),
        ("server CPU during the batch", f"{wide.cpu_s:.2f} s ({wide.cpu_s / max(wide.seconds, 1e-9):.2f} cores)"),
        (
            "cancelled batch",
            f"{a.cancel_users} users, client timeout {a.cancel_after_s:g} s: {cancelled.rpc_status}, "
            f"{cancelled.received} results, {counts(cancelled.codes)}",
        ),
        (
            f"server CPU in the {a.cpu_window_s:g} s after the cancel",
            f"{after[-1][1]:.2f} s (idle baseline {idle_cores:.3f} cores × {a.cpu_window_s:g} s = "
            f"{idle_cores * a.cpu_window_s:.2f} s)",
        ),
        (
            f"last {a.cpu_step_s:g} s slice above {a.busy_cores:g} cores after the cancel",
            "none" if not busy else f"ends at +{max(busy):.1f} s",
        ),
        ("cores per slice after the cancel", " ".join(f"{c:.2f}" for _, c in slices)),
    ]
    return (
        f"## gRPC ScoreBatch: {a.batch_users} users × {a.batch_items} items, deadline {a.batch_deadline_s:g} s\n\n"
        + table(rows)
        + f"HTTP /v1/recommend at {a.rate:g} req/s during the wide batch:\n\n"
    )
