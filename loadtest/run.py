"""Headless SLO run: Locust at a fixed rate for a fixed time against a running server, exact latencies,
then CSV + PNG + markdown. Exits non-zero when p99 > budget or errors > 0.1 %.

Locust runs in a subprocess: importing it monkey-patches the process with gevent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from loadtest.report import plot, summarize

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def run_locust(
    host: str,
    data: Path,
    rate: float,
    duration_s: int,
    users: int,
    csv_path: Path,
    k: int,
    num_candidates: int | None,
    request_budget_ms: float | None,
    write_fraction: float = 0.0,
    api_key: str | None = None,
    active_users: int = 0,
) -> None:
    """One headless Locust run at `rate` for `duration_s`: every request's exact latency in `csv_path`."""
    env = {
        **os.environ,
        "FALCONREC_LT_DATA": str(data),
        "FALCONREC_LT_RATE": str(rate),
        "FALCONREC_LT_USERS": str(users),
        "FALCONREC_LT_OUT": str(csv_path),
        "FALCONREC_LT_K": str(k),
        "FALCONREC_LT_CANDIDATES": str(num_candidates or 0),
        "FALCONREC_LT_BUDGET_MS": str(request_budget_ms or 0),
        "FALCONREC_LT_WRITE_FRACTION": str(write_fraction),
        "FALCONREC_LT_API_KEY": api_key or "",  # the environment, not argv: `ps` shows argv
        "FALCONREC_LT_ACTIVE_USERS": str(active_users),
    }
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(users),
        "--run-time",
        f"{duration_s}s",
        "--stop-timeout",
        "5",
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration_s + 120)
    if proc.returncode != 0 or not csv_path.exists():
        raise RuntimeError(f"locust failed ({proc.returncode}): {proc.stderr[-2000:]}")


def run_loadtest(
    host: str,
    data: Path,
    rate: float,
    duration_s: int,
    users: int,
    out_dir: Path,
    budget_ms: float = 20.0,
    k: int = 10,
    num_candidates: int | None = None,
    request_budget_ms: float | None = None,
    title: str = "falconrec load test",
    write_fraction: float = 0.0,
    api_key: str | None = None,
) -> tuple[int, str]:
    """Reads at `rate`. With `write_fraction` > 0 (the mixed profile) the run has two phases of `duration_s`
    each: reads alone at `rate`, then the same read rate with POST /v1/events added on top (writes are
    `write_fraction` of all requests); the report sets read p99 with writes beside read p99 alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "latencies.csv"
    params = (k, num_candidates, request_budget_ms)
    run_locust(host, data, rate, duration_s, users, csv_path, *params)
    s = summarize(csv_path)
    plot(csv_path, out_dir / "latency.png", budget_ms)
    md = s.markdown(title, budget_ms) + f"\nTarget rate {rate:g} req/s, {users} Locust users, {duration_s} s.\n"
    failed = s.p99 > budget_ms or s.error_rate > 0.001
    if write_fraction > 0:
        mixed_csv = out_dir / "mixed.csv"
        total = rate / (1.0 - write_fraction)  # the read rate stays `rate`; writes come on top
        run_locust(host, data, total, duration_s, users, mixed_csv, *params, write_fraction, api_key)
        reads = summarize(mixed_csv, "/v1/recommend")
        writes = summarize(mixed_csv, "/v1/events")
        plot(mixed_csv, out_dir / "mixed.png", budget_ms)
        md += (
            f"\n## Mixed profile: {100 * write_fraction:g} % of requests are POST /v1/events\n\n"
            "| requests | rate | p50 | p99 | errors |\n|---|---|---|---|---|\n"
            f"| reads alone | {s.rate:.1f}/s | {s.p50:.2f} ms | {s.p99:.2f} ms | {100 * s.error_rate:.2f} % |\n"
            f"| reads, with writes | {reads.rate:.1f}/s | {reads.p50:.2f} ms | {reads.p99:.2f} ms "
            f"| {100 * reads.error_rate:.2f} % |\n"
            f"| writes (events) | {writes.rate:.1f}/s | {writes.p50:.2f} ms | {writes.p99:.2f} ms "
            f"| {100 * writes.error_rate:.2f} % |\n"
        )
        failed = failed or reads.p99 > budget_ms or reads.error_rate > 0.001 or writes.error_rate > 0.001
    (out_dir / "summary.md").write_text(md)
    return (1 if failed else 0), md
