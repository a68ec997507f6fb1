"""The headless Locust runner against the real tiny server (a few seconds, loopback only)."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest

from loadtest.report import summarize
from loadtest.run import run_loadtest


# Never import locust here: it monkey-patches the process with gevent (it runs in a subprocess).
@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
def test_headless_run_writes_csv_png_summary(server, tiny_build, tmp_path):
    rc, md = run_loadtest(
        server.url, tiny_build.paths.data, rate=20, duration_s=4, users=4, out_dir=tmp_path, budget_ms=5000
    )
    assert rc == 0, md
    for f in ("latencies.csv", "latency.png", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0
    s = summarize(tmp_path / "latencies.csv")
    assert s.requests >= 20 and s.error_rate == 0.0
    with open(tmp_path / "latencies.csv") as f:
        lat = [float(r["latency_ms"]) for r in csv.DictReader(f)]
    assert any(x != round(x) for x in lat)  # exact, not Locust's whole-millisecond rounding
    # Arrivals are a Poisson stream, not users firing in lock step (bursts of `users` requests at once).
    with open(tmp_path / "latencies.csv") as f:
        starts = sorted(float(r["t"]) - float(r["latency_ms"]) / 1000 for r in csv.DictReader(f))
    gaps = np.diff(starts)
    assert np.mean(gaps < 0.002) < 0.3, np.round(gaps * 1000, 1)  # lock step: ~75 % of gaps ~0 ms here
    # The same run judged against an impossible SLO fails.
    rc2, _ = run_loadtest(
        server.url, tiny_build.paths.data, rate=10, duration_s=2, users=2, out_dir=tmp_path / "b", budget_ms=0.001
    )
    assert rc2 == 1


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
def test_mixed_profile_reports_reads_alone_beside_reads_with_writes(tiny_build, tmp_path):
    from tests.conftest import RunningServer, server_settings

    key = "loadtest-write-key-0123456789"
    srv = RunningServer(server_settings(tiny_build, api_keys=[f"write:{key}"], grpc_port=0))
    try:
        rc, md = run_loadtest(
            srv.url,
            tiny_build.paths.data,
            rate=10,
            duration_s=3,
            users=2,
            out_dir=tmp_path,
            budget_ms=5000,
            write_fraction=0.3,
            api_key=key,
        )
        events = srv.components.live.metrics.events.labels("written")._value.get()
    finally:
        srv.stop()
    assert rc == 0, md
    assert "reads alone" in md and "reads, with writes" in md and "writes (events)" in md
    writes = summarize(tmp_path / "mixed.csv", "/v1/events")
    assert writes.requests > 0 and writes.error_rate == 0.0 and events == writes.requests
    assert summarize(tmp_path / "mixed.csv", "/v1/recommend").requests > 0


@pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="locust not installed")
def test_locust_beside_the_open_loop_asks_only_the_same_active_users(tiny_build, tmp_path, monkeypatch):
    """`falconrec deadline`'s Locust row: a real Locust run, its numbers as a table row, drawn from the open loop's
    users only (here the 3 most active: a Zipf draw over every tiny user would reach more than 3 in 60 requests)."""
    import loadtest.deadline as deadline
    from tests.conftest import RunningServer, server_settings

    monkeypatch.setattr(deadline, "ACTIVE_USERS", 3)
    srv = RunningServer(server_settings(tiny_build, grpc_port=0))
    try:
        line = deadline.locust_row(srv.url, tiny_build.paths.data, rate=20, seconds=3, out=tmp_path)
        histories = len(srv.components.recommender.users.user_vec_cache)
    finally:
        srv.stop()
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == 6 and cells[0] == "20" and cells[-1] == "0.0 %", line
    assert summarize(tmp_path / "locust-20.csv").requests >= 20
    assert 1 <= histories <= 3
