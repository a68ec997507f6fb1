"""Issue 22, point 2: memory for item ids depends on how many items there are, not on the values of their ids.

The catalog sized a dense id -> index table by the largest id and copied it on every add: one-item POSTs with ids
2^21 - 1 ... 2^26 - 1 took the API from 258 to 796 MB. The ids below climb the same way (2^20 - 1, then each
doubling) and the growth is checked before going further, so the old code fails at 2^26 (~0.5 GB) without trying
2^27 and beyond (it would have tried to allocate 2^62 x 8 bytes).
"""

from __future__ import annotations

import time
import tracemalloc

import httpx
import numpy as np
import pytest

from service.catalog import Catalog
from tests.conftest import RunningServer, server_settings

CLIMB = [2**k - 1 for k in range(20, 27)]  # the attack, one item at a time
HUGE = [2**40 + 7, 2**53 + 1, 2**62 + 3, 2**63 - 1]
SECRET = "catalog-ids-write-key-0123456789"
AUTH = {"authorization": f"Bearer {SECRET}"}


@pytest.fixture
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


def _traced_growth(fn) -> int:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_huge_ids_cost_bytes_per_item_not_per_id_value(catalog):
    """Bound: adding items grows the catalog by under 64 KB + 1 KB per item (the slack is one doubling of the id
    buffer and a dict resize; the old table grew by 8 bytes per id value: ~512 MB at 2^26)."""
    n0 = catalog.num_items
    climb = _traced_growth(lambda: [catalog.add_items([i], [f"t{i}"]) for i in CLIMB])
    assert climb < (64 << 10) + 1024 * len(CLIMB), climb
    rng = np.random.default_rng(0)
    many = [int(x) for x in np.unique(rng.integers(2**32, 2**63 - 1, 3000, dtype=np.int64))]
    rest = _traced_growth(lambda: [catalog.add_items([i], ["x"]) for i in [*HUGE, *many]])
    # (this includes the merges of recent ids into the sorted index)
    assert rest < (64 << 10) + 1024 * (len(HUGE) + len(many)), rest
    added = [*CLIMB, *HUGE, *many]
    assert catalog.to_index(np.array(added)).tolist() == list(range(n0 + 1, n0 + 1 + len(added)))
    trained = catalog.raw_ids[:n0]
    assert catalog.to_index(trained).tolist() == list(range(1, n0 + 1))  # the build's items keep their indices
    unknown = np.array([2**62 + 4, 2**26, -1, -(2**63)])
    assert catalog.to_index(unknown).tolist() == [0] * len(unknown)
    assert catalog.raw_ids[n0 : n0 + 2].tolist() == CLIMB[:2] and catalog.titles[n0] == f"t{CLIMB[0]}"
    assert catalog.to_index(np.array([CLIMB[0]]))[0] > catalog.num_trained  # live: no ID embedding of its own


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _post_and_wait(c: httpx.Client, item_id: int) -> None:
    r = c.post(
        "/v1/items", json={"items": [{"item_id": item_id, "text": f"Item {item_id} (2001) | Drama"}]}, headers=AUTH
    )
    assert r.status_code == 202, r.text
    end = time.time() + 120
    body = {"history": [{"item_id": item_id, "ts": 1}], "item_ids": [item_id]}
    while c.post("/v1/score", json=body).status_code != 200:
        assert time.time() < end, f"item {item_id} not servable"
        time.sleep(0.05)


def test_one_item_posts_with_huge_ids_leave_rss_flat(tiny_build):
    """Over HTTP with the real ingestion worker: the issue's POSTs (ids 2^20 - 1 ... 2^26 - 1), then ids up to
    2^63 - 1. Bound: the API process (this one) grows by under 64 MB across all of them (before: ~0.5 GB by 2^26)."""
    srv = RunningServer(server_settings(tiny_build, grpc_port=0, api_keys=[f"write:{SECRET}"]))
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            _post_and_wait(c, 123_456)  # starts the worker; first-call allocations happen before the baseline
            base = _rss_bytes()
            for item_id in CLIMB:
                _post_and_wait(c, item_id)
            assert _rss_bytes() - base < 64 << 20, (_rss_bytes() - base) >> 20
            for item_id in HUGE:
                _post_and_wait(c, item_id)
            assert _rss_bytes() - base < 64 << 20, (_rss_bytes() - base) >> 20
            r = c.post("/v1/recommend", json={"history": [{"item_id": HUGE[-1], "ts": 1}], "exclude_seen": False})
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
