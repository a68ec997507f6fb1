"""The in-process feature store (the embedded default, no network)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from service.catalog import Catalog
from service.stores.base import Appended, Embeddings, Event, FeatureStore, merge_history


class InProcessStore(FeatureStore):
    """Everything in memory from the built artifacts: no network, used when no Redis is configured."""

    name = "in-process"

    def __init__(self, catalog: Catalog, content_emb: np.ndarray):
        self.catalog = catalog
        self.table = np.zeros((content_emb.shape[0] + 1, content_emb.shape[1]), np.float32)
        self.table[1:] = content_emb
        self.rows = len(self.table)  # rows in use; the table has room for more (add_embeddings)
        self.histories = dict(catalog.user_histories)  # the build's, then appended to by events
        self.seen_events: dict[int, OrderedDict[str, None]] = {}

    async def embeddings(self, item_ids, timeout_s):
        idx = self.catalog.to_index(item_ids)
        idx = np.where(idx < self.rows, idx, 0)  # indexed in the catalog, row not here yet: not found
        return Embeddings(self.table[idx], idx > 0)

    async def history(self, user_id, timeout_s):
        return self.histories.get(int(user_id))

    async def append_events(self, events, cap, dedup_window):
        # No await between reading and writing: on the event loop this is atomic, as the Redis script is.
        fresh: dict[int, list[Event]] = {}
        dups = 0
        for e in events:
            seen = self.seen_events.setdefault(e.user_id, OrderedDict())
            if e.event_id is not None:
                if e.event_id in seen:
                    dups += 1
                    continue
                seen[e.event_id] = None
                while len(seen) > dedup_window:
                    seen.popitem(last=False)
            fresh.setdefault(e.user_id, []).append(e)
        empty = (np.empty(0, np.int64), np.empty(0, np.int64))
        for u, evs in fresh.items():
            items, ts = self.histories.get(u, empty)
            new_i = np.array([e.item_id for e in evs], np.int64)
            new_t = np.array([e.ts for e in evs], np.int64)
            self.histories[u] = merge_history(items, ts, new_i, new_t, cap)
        return Appended(len(events) - dups, dups, len({e.user_id for e in events}))

    def add_embeddings(self, item_ids, index, vectors):
        # Doubling, not growing to fit: a copy of the whole table on every add stalled the event loop (issue 22).
        n = int(index.max()) + 1
        if n > len(self.table):
            table = np.zeros((max(n, 2 * len(self.table)), self.table.shape[1]), np.float32)
            table[: self.rows] = self.table[: self.rows]
            self.table = table
        self.table[index] = vectors
        self.rows = max(self.rows, n)

    def status(self) -> dict:
        return {"store": self.name, "ok": True, "items": self.catalog.num_items}
