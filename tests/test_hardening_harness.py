"""The hardening harness (loadtest/hardening/) end to end, small: one `falconrec serve` subprocess on a redis-server of
the harness's own, on the session's tiny build, four of its parts (slowbody, hugeids, freeze, workerkill), and the
numbers each returns. What the service must do is asserted by the tests of each issue (test_slow_clients,
test_catalog_ids, test_write_retries, test_ingest_supervision); here: the harness makes the attack and counts
right. No timing assertions: the timeouts are generous bounds for a busy 2-core box."""

from __future__ import annotations

import shutil

import pytest

from loadtest.hardening import Options, run
from loadtest.hardening.options import parse_args

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")

MIB = 1 << 20
SLOW_SOCKETS = 70  # more than the 64 admission slots


@pytest.fixture(scope="module")
def report(tiny_build, tmp_path_factory):
    opts = Options(
        config="tiny",
        artifacts=tiny_build.artifacts,
        repo=tiny_build.repo,
        out=tmp_path_factory.mktemp("hardening"),
        parts=("slowbody", "hugeids", "freeze", "workerkill"),
        warmup=5,
        rate=10.0,
        server_env=["FALCONREC_BODY_TIMEOUT_S=2", "FALCONREC_REDIS_RETRY_S=0.2"],
        startup_timeout_s=120.0,
        slow_sockets=SLOW_SOCKETS,
        slow_wait_s=60.0,
        slow_after_s=1.0,
        huge_burst=50,
        item_wait_s=180.0,
        freeze_batches=2,
        freeze_unkeyed=0,
        freeze_events=3,
        kill_items=10,
        kill_wait_s=180.0,
    )
    return run(opts)


def test_slow_bodies_get_408_and_normal_requests_are_served(report):
    r = report.raw["slowbody"]
    assert r["slow"]["statuses"] == {408: SLOW_SOCKETS}, r["slow"]
    assert all(k.startswith("408 request body not received") for k in r["slow"]["answers"]), r["slow"]
    held = r["normal"]["held"]
    assert held["n"] > 0 and held["ok"] + held["degraded"] == held["n"], held  # all 200 while the 70 were held
    released = r["normal"]["released"]
    assert released["ok"] + released["degraded"] == released["n"], released


def test_huge_ids_are_servable_and_leave_rss_flat(report):
    """Bound: the API grows by under 64 MB over the climb to 2^26 - 1 (the old dense id table: ~512 MB there) and
    under 256 MB over the whole part, burst of ids up to 2^63 included (the old one could not allocate them)."""
    r = report.raw["hugeids"]
    assert all(step["servable"] for step in r["climb"]) and r["burst"]["not_servable"] == 0, r
    assert r["rss_after_climb"] - r["rss_before"] < 64 * MIB, r["rss_after_climb"] - r["rss_before"]
    assert r["rss_delta"] < 256 * MIB, r["rss_delta"]
    assert r["post_statuses"] == {"202": len(r["climb"]) + r["burst"]["n"]}, r["post_statuses"]
    assert r["longest_stall_ms"] is not None  # measured (its size depends on the box: no bound here)


def test_frozen_writes_retried_with_their_key_are_stored_once(report):
    r = report.raw["freeze"]
    assert r["first_statuses"] == {503: 2} and r["final_statuses"] == {200: 2}, r
    assert r["keyed"] == {"once": 6, "twice": 0, "not stored": 0, "more": 0}, r["keyed"]


def test_killed_worker_items_all_become_servable(report):
    r = report.raw["workerkill"]
    assert r["worker_pid"] is not None and r["post_status"] == 202, r
    assert r["servable"] == 10 and r["new_worker_s"] is not None, r
    assert any(k.startswith("degraded") for k in r["readyz_polls"]), r["readyz_polls"]


def test_the_report_has_a_section_per_part_and_the_log_summary(report):
    md = report.markdown
    for title in ("1. Slow bodies", "2. Huge item ids", "3. Redis frozen", "4. Ingestion worker killed", "Server log"):
        assert f"## {title}" in md, title
    assert "Traceback" not in report.raw["log_findings"], report.raw["log_findings"]


def test_options_parse_from_the_command_line():
    opts = parse_args(["--parts", "freeze,slowbody", "--slow-sockets", "5", "--server-env", "FALCONREC_X=1"])
    assert opts.parts == ("freeze", "slowbody") and opts.slow_sockets == 5 and opts.server_env == ["FALCONREC_X=1"]
    assert opts.cancel_users == opts.batch_users
    with pytest.raises(SystemExit):
        parse_args(["--parts", "nope"])
