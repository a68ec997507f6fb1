"""Issue 22, point 4: the API supervises the ingestion worker it spawned.

The real worker (the build's text model) is killed with SIGKILL right after a 30-item POST, and no further POST
is sent: every accepted item becomes servable anyway (before: 0 of 30 in 75 s), /readyz says degraded while the
jobs wait for a worker, and /metrics counts the restart and the waiting jobs. With Redis (a redis-server of the
test's own: the new worker claims the dead one's pending jobs) and without (the jobs are sent to the new worker).
"""

from __future__ import annotations

import os
import shutil
import signal
import time

import httpx
import pytest

from exporters.redis_loader import load_redis
from tests.conftest import RedisProcess, RunningServer, server_settings

SECRET = "supervision-key-0123456789"
AUTH = {"authorization": f"Bearer {SECRET}"}
WAIT_S = 180.0  # generous: a worker restart loads torch and the text model on a busy 2-core box


def _value(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def _servable(c: httpx.Client, item_id: int) -> bool:
    body = {"history": [{"item_id": item_id, "ts": 1}], "item_ids": [item_id]}
    return c.post("/v1/score", json=body).status_code == 200


@pytest.mark.parametrize("store", ["redis", "in-process"])
def test_killed_worker_is_restarted_and_its_items_become_servable(tiny_build, store):
    if store == "redis" and shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    rp = RedisProcess() if store == "redis" else None
    extra = {}
    if rp is not None:
        load_redis(rp.url, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
        extra = {"redis_url": rp.url, "redis_retry_s": 0.2, "ingest_worker": "start"}
    srv = RunningServer(server_settings(tiny_build, grpc_port=0, api_keys=[f"write:{SECRET}"], **extra))
    ids = list(range(6_600_000, 6_600_030))
    items = [{"item_id": i, "text": f"Killed Ghost {i} (1999) | Horror"} for i in ids]
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            # A worker that is up and has done a job: killed, it dies holding some of the 30.
            first = {"item_id": 6_599_999, "text": "Warm Ghost (1998) | Horror"}
            assert c.post("/v1/items", json={"items": [first]}, headers=AUTH).status_code == 202
            end = time.time() + WAIT_S
            while not _servable(c, first["item_id"]):
                assert time.time() < end, "the worker did not start"
                time.sleep(0.1)
            pid = srv.components.live.feed.proc.pid
            base = os.getpriority(os.PRIO_PROCESS, 0)
            assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, base + 10)  # ingest_nice: serving wins the CPU
            r = c.post("/v1/items", json={"items": items}, headers=AUTH)
            assert r.status_code == 202, r.text
            os.kill(pid, signal.SIGKILL)
            seen_degraded = False
            waiting, end = set(ids), time.time() + WAIT_S
            while waiting:
                assert time.time() < end, f"{len(waiting)} of 30 items not servable within {WAIT_S} s"
                ready = c.get("/readyz").json()
                seen_degraded |= ready["status"] == "degraded" and any(
                    "ingestion worker" in x for x in ready["reasons"]
                )
                waiting = {i for i in waiting if not _servable(c, i)}
                time.sleep(0.1)
            assert seen_degraded  # jobs waited with no worker to take them: said so
            text = c.get("/metrics").text
            assert _value(text, "falconrec_ingest_worker_restarts_total") >= 1
            assert "falconrec_ingest_jobs_waiting" in text and "falconrec_ingest_oldest_job_seconds" in text
            end = time.time() + WAIT_S
            while c.get("/readyz").json()["status"] != "ok":  # the queue drained: ready again
                assert time.time() < end, c.get("/readyz").json()
                time.sleep(0.2)
    finally:
        srv.stop()
        if rp is not None:
            rp.kill()
