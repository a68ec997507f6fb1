"""Locust: POST /v1/recommend for users drawn with a Zipf skew (heavy users more often), Poisson arrivals at a fixed
mean rate.

Run through `falconrec loadtest` (loadtest/run.py), which sets:
  FALCONREC_LT_DATA     dataset .npz from the build (user ids and history lengths)
  FALCONREC_LT_RATE     total requests/second (split over the Locust users)
  FALCONREC_LT_USERS    number of Locust users
  FALCONREC_LT_OUT      CSV of exact per-request latencies (Locust's own CSV rounds to whole ms)
  FALCONREC_LT_K / _CANDIDATES / _BUDGET_MS  request parameters
"""

from __future__ import annotations

import csv
import os
import time

import gevent
import numpy as np
from locust import FastHttpUser, events, task

RATE = float(os.environ.get("FALCONREC_LT_RATE", "20"))
N_USERS = int(os.environ.get("FALCONREC_LT_USERS", "10"))
K = int(os.environ.get("FALCONREC_LT_K", "10"))
CANDIDATES = int(os.environ.get("FALCONREC_LT_CANDIDATES", "0")) or None
BUDGET_MS = float(os.environ.get("FALCONREC_LT_BUDGET_MS", "0")) or None

_z = np.load(os.environ["FALCONREC_LT_DATA"], allow_pickle=False)
_order = np.argsort(-_z["lengths"], kind="stable")  # most active users first
USER_IDS = _z["user_raw_ids"][_order]
_w = 1.0 / np.arange(1, len(USER_IDS) + 1) ** 1.07
WEIGHTS = _w / _w.sum()
_rng = np.random.default_rng(int(os.environ.get("FALCONREC_LT_SEED", "0")))

_out = open(os.environ.get("FALCONREC_LT_OUT", "latencies.csv"), "w", newline="")  # noqa: SIM115
_writer = csv.writer(_out)
_writer.writerow(["t", "name", "latency_ms", "status", "degraded", "server_ms", "error"])


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, context=None, **kw):
    # response_time here is Locust's own float milliseconds, before any CSV rounding.
    status = getattr(response, "status_code", 0) if response is not None else 0
    degraded = server_ms = ""
    if response is not None and status == 200:
        try:
            body = response.json()
            degraded = int(bool(body.get("degraded")))
            # The service's own time, arrival to response built: the rest is HTTP, loopback and this client.
            server_ms = f"{sum(body.get('timings_ms', {}).values()):.3f}"
        except Exception:  # noqa: BLE001
            degraded = server_ms = ""
    _writer.writerow(
        [
            f"{time.time():.4f}",
            name,
            f"{response_time:.3f}",
            status,
            degraded,
            server_ms,
            "" if exception is None else type(exception).__name__,
        ]
    )


@events.quitting.add_listener
def _close(environment, **kw):
    _out.flush()
    _out.close()


class RecommendUser(FastHttpUser):
    def on_start(self) -> None:
        # A random phase before the first request too: otherwise every user fires at spawn, all at once.
        gevent.sleep(self.wait_time())

    def wait_time(self) -> float:
        # Exponential gaps: each user is a Poisson source, so together they are one Poisson stream at RATE.
        # (constant_throughput kept the users in lock step: all of them fired in the same millisecond once a
        # second, a burst of N_USERS requests that measured queueing behind the burst, not the service.)
        return float(_rng.exponential(N_USERS / RATE))

    @task
    def recommend(self) -> None:
        uid = int(_rng.choice(USER_IDS, p=WEIGHTS))
        body = {"user_id": uid, "k": K}
        if CANDIDATES:
            body["num_candidates"] = CANDIDATES
        if BUDGET_MS:
            body["budget_ms"] = BUDGET_MS
        with self.client.post("/v1/recommend", json=body, name="/v1/recommend", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
