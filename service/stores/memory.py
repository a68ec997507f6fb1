"""The in-process feature store (the embedded default, no network)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from service.catalog import Catalog
from service.stores.base import Appended, Event, FeatureStore, merge_history


class InProcessStore(FeatureStore):
    """Everything in memory from the built artifacts: no network, used when no Redis is configured."""

    name = "in-process"

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.histories = dict(catalog.user_histories)  # the build's, then appended to by events
        self.seen_events: dict[int, OrderedDict[str, None]] = {}

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

    def status(self) -> dict:
        return {"store": self.name, "ok": True, "items": self.catalog.num_items}
