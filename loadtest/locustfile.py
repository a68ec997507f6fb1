"""Locust: POST /v1/recommend for users drawn with a Zipf skew (heavy users more often) at a fixed rate.

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

import numpy as np
from locust import FastHttpUser, constant_throughput, events, task

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
_writer.writerow(["t", "name", "latency_ms", "status", "degraded", "error"])


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, context=None, **kw):
    # response_time here is Locust's own float milliseconds, before any CSV rounding.
    status = getattr(response, "status_code", 0) if response is not None else 0
    degraded = ""
    if response is not None and status == 200:
        try:
            degraded = int(bool(response.json().get("degraded")))
        except Exception:  # noqa: BLE001
            degraded = ""
    _writer.writerow(
        [
            f"{time.time():.4f}",
            name,
            f"{response_time:.3f}",
            status,
            degraded,
            "" if exception is None else type(exception).__name__,
        ]
    )


@events.quitting.add_listener
def _close(environment, **kw):
    _out.flush()
    _out.close()


class RecommendUser(FastHttpUser):
    wait_time = constant_throughput(RATE / N_USERS)

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
