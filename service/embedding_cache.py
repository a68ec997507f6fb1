"""The bounded in-process cache of content embeddings in front of Redis, looked up a whole request at a time.

A request reads ~1,200 embeddings (200 history items + 1,000 candidates). A dict/LRU costs about a
microsecond of Python per id plus a row copy each, ~2-3 ms per request on the event loop; this cache is
direct-mapped (an id lives only in slot `id % capacity`) so a lookup is a few numpy operations over the
whole batch (~30 us). Ids that share a slot evict each other; with capacity >= the catalog none do.
Rows are kept as float32, converted once on insert: numpy's float16 -> float32 conversion costs ~0.8 ms per
request-sized read (1,000 x 576) and would otherwise run on every request. Memory is reserved lazily by the
OS: at most capacity x E x 4 bytes (100,000 x 576 -> 230 MB), in 4 KiB pages as rows are first written.

The rows live in a private anonymous mmap advised against huge pages, not in `np.zeros`: numpy asks the kernel for
transparent huge pages on large arrays, so the first write into each 2 MiB region of this sparsely filled table
committed 2 MiB, and the kernel's compaction to find a free huge page held the event loop in `put` for up to
~270 ms during a burst of item adds (py-spy; issue 22). With 4 KiB pages RSS grows with the rows written.
"""

from __future__ import annotations

import mmap

import numpy as np


class EmbeddingCache:
    def __init__(self, capacity: int, dim: int):
        self.capacity = capacity
        self.dim = dim
        self.version: str | None = None
        self._tags = np.full(max(capacity, 0), -1, np.int64)
        n = max(capacity, 0)
        # Private anonymous memory, zero-filled, told not to use huge pages (see the module's docstring).
        self._buf = mmap.mmap(-1, max(n * dim * 4, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._buf.madvise(mmap.MADV_NOHUGEPAGE)
        self._rows = np.frombuffer(self._buf, np.float32, count=n * dim).reshape(n, dim)
        self.hits = 0
        self.misses = 0

    def _switch(self, version: str) -> None:
        # Keys carry the embedding version: a new version makes every cached row stale at once.
        if version != self.version:
            self._tags.fill(-1)
            self.version = version

    def get(self, version: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [n, dim] with zeros where missing, found bool [n])."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), self.dim), np.float32)
        if self.capacity <= 0:
            self.misses += len(ids)
            return out, np.zeros(len(ids), bool)
        self._switch(version)
        slots = ids % self.capacity
        found = (self._tags[slots] == ids) & (ids >= 0)
        hits = int(found.sum())
        if hits == len(ids):  # the common case once warm: one gather, no masked scatter
            out = self._rows[slots]
        else:
            out[found] = self._rows[slots[found]]
        self.hits += hits
        self.misses += len(ids) - hits
        return out, found

    def put(self, version: str, ids: np.ndarray, rows: np.ndarray) -> None:
        if self.capacity <= 0:
            return
        self._switch(version)
        ids = np.asarray(ids, np.int64)
        ok = ids >= 0
        slots = ids[ok] % self.capacity
        self._tags[slots] = ids[ok]
        self._rows[slots] = rows[ok]

    def __len__(self) -> int:
        return int(np.count_nonzero(self._tags >= 0))
