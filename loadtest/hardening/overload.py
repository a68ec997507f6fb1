"""3. overload: open-loop arrivals well above capacity (--overload-rate): what share is served, shed (503 with
Retry-After) or lost, how long each kind took, and what the server and this load generator burned."""

from __future__ import annotations

import asyncio
import time

from loadtest.hardening.stack import Stack
from loadtest.hardening.stats import PhaseStats, counts, details_lines, fmt, table
from loadtest.hardening.traffic import Stream
from loadtest.procs import cpu_seconds


async def measure(s: Stack) -> tuple[str, dict]:
    a = s.opts
    stream = Stream(s, a.overload_rate, a.seed + 4, connections=a.overload_connections)
    t, server_cpu, own_cpu = time.monotonic(), cpu_seconds(s.server.pid), time.process_time()
    answers = await stream.run(lambda: "overload", asyncio.Event(), a.overload_s)
    wall = time.monotonic() - t
    # The generator shares the cores with the server here: its own CPU says how much of the server's it took.
    server_cores = (cpu_seconds(s.server.pid) - server_cpu) / wall
    own_cores = (time.process_time() - own_cpu) / wall
    st = PhaseStats.of("overload", a.overload_s, answers)
    n = max(st.n, 1)
    others = sum(st.other.values()) + sum(st.client_errors.values()) + st.not_found
    rows = [
        ("arrivals", f"{st.n} ({st.n / a.overload_s:.1f}/s; last answer after {wall:.1f} s)"),
        (
            "200",
            f"{100 * st.served / n:.1f} % ({st.served / a.overload_s:.1f}/s), of them degraded "
            f"{100 * st.degraded / max(st.served, 1):.1f} %",
        ),
        ("503", f"{100 * st.unavailable / n:.1f} % ({st.no_retry_after} without Retry-After)"),
        (
            "other",
            f"{100 * others / n:.1f} % (404: {st.not_found}; {counts(st.other)}; client: {counts(st.client_errors)})",
        ),
        ("200 latency p50 / p99 (client)", f"{fmt(st.p50_200)} / {fmt(st.p99_200)} ms"),
        ("503 latency p50 / p99 (client)", f"{fmt(st.p50_503)} / {fmt(st.p99_503)} ms"),
        ("server's own time of the 200s (sum of timings_ms) p99", f"{fmt(st.server_p99)} ms"),
        ("client lag p99 (arrival sent late)", f"{fmt(st.lag_p99)} ms"),
        ("CPU: server / this load generator", f"{server_cores:.2f} / {own_cores:.2f} cores"),
    ]
    md = (
        f"## Overload: {a.overload_rate:g} req/s open loop for {a.overload_s:g} s "
        f"(≤ {a.overload_connections} connections), server budget {a.budget_ms:g} ms\n\n"
        + table(rows)
        + details_lines([st])
    )
    return md, {"wall_s": wall, "server_cores": server_cores, "client_cores": own_cores, **st.as_dict()}
