"""Locust: POST /v1/recommend for users drawn with a Zipf skew (heavy users more often), Poisson arrivals at a fixed
mean rate.

Run through `falconrec loadtest` (loadtest/run.py), which sets:
  FALCONREC_LT_DATA     dataset .npz from the build (user ids and history lengths)
  FALCONREC_LT_RATE     total requests/second (split over the Locust users)
  FALCONREC_LT_USERS    number of Locust users
  FALCONREC_LT_OUT      CSV of exact per-request latencies (Locust's own CSV rounds to whole ms)
  FALCONREC_LT_K / _CANDIDATES / _BUDGET_MS  request parameters
  FALCONREC_LT_WRITE_FRACTION  share of requests that are POST /v1/events (the mixed profile; default 0)
  FALCONREC_LT_API_KEY  the write key those need (an environment variable, never a command-line argument)
  FALCONREC_LT_ACTIVE_USERS  draw only from this many of the most active users (default 0: all of them)
"""

from __future__ import annotations

import csv
import os
import time
import uuid

import gevent
import numpy as np
from locust import FastHttpUser, events, task

RATE = float(os.environ.get("FALCONREC_LT_RATE", "20"))
N_USERS = int(os.environ.get("FALCONREC_LT_USERS", "10"))
K = int(os.environ.get("FALCONREC_LT_K", "10"))
CANDIDATES = int(os.environ.get("FALCONREC_LT_CANDIDATES", "0")) or None
BUDGET_MS = float(os.environ.get("FALCONREC_LT_BUDGET_MS", "0")) or None
WRITE_FRACTION = float(os.environ.get("FALCONREC_LT_WRITE_FRACTION", "0"))
_AUTH = {"authorization": f"Bearer {os.environ.get('FALCONREC_LT_API_KEY', '')}"}

_z = np.load(os.environ["FALCONREC_LT_DATA"], allow_pickle=False)
_order = np.argsort(-_z["lengths"], kind="stable")  # most active users first
_order = _order[: int(os.environ.get("FALCONREC_LT_ACTIVE_USERS", "0")) or None]
# The catalog's own ids as a client sends them: its strings when it has them (issue 24), else the integers.
USER_IDS = (_z["user_keys"] if "user_keys" in _z.files else _z["user_raw_ids"])[_order].tolist()
_w = 1.0 / np.arange(1, len(USER_IDS) + 1) ** 1.07
WEIGHTS = _w / _w.sum()
ITEM_IDS = (_z["item_keys"] if "item_keys" in _z.files else _z["item_raw_ids"]).tolist()
_rng = np.random.default_rng(int(os.environ.get("FALCONREC_LT_SEED", "0")))
_events = 0
_RUN = uuid.uuid4().hex[:12]  # event ids unique across runs: a rerun must not be deduplicated away

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
    def request(self) -> None:
        # One Poisson stream; each arrival is a write with probability WRITE_FRACTION (the mixed profile).
        if WRITE_FRACTION and _rng.random() < WRITE_FRACTION:
            self.event()
        else:
            self.recommend()

    def event(self) -> None:
        global _events
        _events += 1
        uid = USER_IDS[_rng.choice(len(USER_IDS), p=WEIGHTS)]  # active users click more: the same skew as reads
        ev = {
            "user_id": uid,
            "item_id": ITEM_IDS[_rng.integers(len(ITEM_IDS))],
            "ts": int(time.time()),
            "event_id": f"lt-{_RUN}-{_events}",
        }
        with self.client.post(
            "/v1/events", json={"events": [ev]}, headers=_AUTH, name="/v1/events", catch_response=True
        ) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")

    def recommend(self) -> None:
        uid = USER_IDS[_rng.choice(len(USER_IDS), p=WEIGHTS)]
        body = {"user_id": uid, "k": K}
        if CANDIDATES:
            body["num_candidates"] = CANDIDATES
        if BUDGET_MS:
            body["budget_ms"] = BUDGET_MS
        with self.client.post("/v1/recommend", json=body, name="/v1/recommend", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
