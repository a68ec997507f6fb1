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
) -> tuple[int, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "latencies.csv"
    env = {
        **os.environ,
        "FALCONREC_LT_DATA": str(data),
        "FALCONREC_LT_RATE": str(rate),
        "FALCONREC_LT_USERS": str(users),
        "FALCONREC_LT_OUT": str(csv_path),
        "FALCONREC_LT_K": str(k),
        "FALCONREC_LT_CANDIDATES": str(num_candidates or 0),
        "FALCONREC_LT_BUDGET_MS": str(request_budget_ms or 0),
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
    s = summarize(csv_path)
    plot(csv_path, out_dir / "latency.png", budget_ms)
    md = s.markdown(title, budget_ms) + f"\nTarget rate {rate:g} req/s, {users} Locust users, {duration_s} s.\n"
    (out_dir / "summary.md").write_text(md)
    failed = s.p99 > budget_ms or s.error_rate > 0.001
    return (1 if failed else 0), md
