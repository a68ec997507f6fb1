"""POST /v1/items -> recommendable, measured from outside against running replicas (`falconrec ingest-latency`).

- one at a time: POST one item, poll the (other) replica until it serves it; p50/p99 over the items;
- a burst: POST all items at once (in batches of the API limit) and time until the last is servable: the
  worker's items/s end to end (queue, LLM, Redis, every replica's item tower and FAISS add).

"Servable" is what /v1/score answers 200 for: the item is in that replica's catalog, store and FAISS index (one
event-loop step adds it to all three). Poll interval 5 ms, so results are accurate to about that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import numpy as np

POLL_S = 0.005


@dataclass
class IngestReport:
    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    burst_n: int
    burst_s: float

    @property
    def items_per_s(self) -> float:
        return self.burst_n / self.burst_s if self.burst_s else 0.0

    def markdown(self) -> str:
        return (
            "| measurement | value |\n|---|---|\n"
            f"| POST -> recommendable, one at a time (n={self.n}) | p50 {self.p50_ms:.0f} ms, "
            f"p99 {self.p99_ms:.0f} ms, max {self.max_ms:.0f} ms |\n"
            f"| burst of {self.burst_n} items -> all recommendable | {self.burst_s:.2f} s, "
            f"{self.items_per_s:.1f} items/s |\n"
        )


def _servable(c: httpx.Client, item_id: int) -> bool:
    body = {"history": [{"item_id": item_id, "ts": 1}], "item_ids": [item_id], "budget_ms": 1000}
    return c.post("/v1/score", json=body).status_code == 200


def _wait(c: httpx.Client, item_id: int, timeout_s: float) -> None:
    end = time.perf_counter() + timeout_s
    while not _servable(c, item_id):
        if time.perf_counter() > end:
            raise TimeoutError(f"item {item_id} not servable within {timeout_s:g} s")
        time.sleep(POLL_S)


def measure_ingest(
    post_url: str,
    see_url: str,
    api_key: str,
    texts: list[str],
    start_id: int,
    burst_texts: list[str] | None = None,
    batch: int = 64,
    timeout_s: float = 120.0,
) -> IngestReport:
    auth = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=post_url, timeout=30) as cp, httpx.Client(base_url=see_url, timeout=30) as cs:
        lat = []
        for j, text in enumerate(texts):
            item_id = start_id + j
            t0 = time.perf_counter()
            r = cp.post("/v1/items", json={"items": [{"item_id": item_id, "text": text}]}, headers=auth)
            r.raise_for_status()
            _wait(cs, item_id, timeout_s)
            lat.append((time.perf_counter() - t0) * 1000)
        burst = burst_texts or []
        first = start_id + len(texts)
        t0 = time.perf_counter()
        for a in range(0, len(burst), batch):
            items = [{"item_id": first + a + j, "text": t} for j, t in enumerate(burst[a : a + batch])]
            cp.post("/v1/items", json={"items": items}, headers=auth).raise_for_status()
        for j in range(len(burst)):
            _wait(cs, first + j, timeout_s)
        burst_s = time.perf_counter() - t0
    a = np.array(lat) if lat else np.zeros(1)
    return IngestReport(
        len(lat),
        float(np.percentile(a, 50)),
        float(np.percentile(a, 99)),
        float(a.max()),
        len(burst),
        burst_s,
    )


def variants(texts: list[str], n: int, tag: str) -> list[str]:
    """New item texts in the catalog's style: 'Title (Year) | Genres' with the title changed."""
    out = []
    for j in range(n):
        title, _, rest = str(texts[j % len(texts)]).partition(" | ")
        out.append(f"{title} {tag} {j}" + (f" | {rest}" if rest else ""))
    return out
