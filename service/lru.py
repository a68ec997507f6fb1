"""A small bounded LRU with optional TTL (per-history K/V and user vectors, tower states, local histories)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    def __init__(self, capacity: int, ttl_s: float | None = None):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._d: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        item = self._d.get(key)
        if item is None or (self.ttl_s is not None and time.monotonic() - item[0] > self.ttl_s):
            if item is not None:
                del self._d[key]
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: K, value: V) -> None:
        if self.capacity <= 0:
            return
        self._d[key] = (time.monotonic(), value)
        self._d.move_to_end(key)
        while len(self._d) > self.capacity:
            self._d.popitem(last=False)

    def pop(self, key: K) -> None:
        self._d.pop(key, None)

    def __len__(self) -> int:
        return len(self._d)

    def clear(self) -> None:
        self._d.clear()
