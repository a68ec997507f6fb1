"""Raw item id -> dense item index, in memory proportional to the number of items whatever their id values.

It replaced a dense table sized by the largest id (issue 22): six one-item POSTs with ids up to 2^26 - 1 took the
API from 258 to 796 MB and copied the whole table on every add, stalling the event loop for up to 1.2 s.

Lookups are vectorised (`np.searchsorted` over sorted ids: ~1,200 ids per request). Ids added since the last merge
sit in a dict; they are merged into the sorted arrays once they number a sixteenth of them, so an add costs O(1)
amortised and the occasional merge is one O(n) pass (np.insert), never a sort of the whole catalog.
"""

from __future__ import annotations

import numpy as np

MIN_MERGE = 256  # recent ids kept in the dict before a merge, at least


class IdIndex:
    def __init__(self, raw_ids: np.ndarray, indices: np.ndarray):
        order = np.argsort(raw_ids, kind="stable")
        self._keys = np.asarray(raw_ids, np.int64)[order]
        self._vals = np.asarray(indices, np.int64)[order]
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)

    def add(self, raw_ids: list[int], indices: list[int]) -> None:
        """New ids (not present yet). Event loop only: a lookup never sees a half-made merge."""
        self._recent.update(zip(raw_ids, indices, strict=True))
        if len(self._recent) >= max(MIN_MERGE, len(self._keys) // 16):
            self._merge()

    def _merge(self) -> None:
        keys = np.fromiter(self._recent.keys(), np.int64, len(self._recent))
        vals = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        at = np.searchsorted(self._keys, keys)
        self._keys, self._vals = np.insert(self._keys, at, keys), np.insert(self._vals, at, vals)
        self._recent = {}

    def lookup(self, raw_ids: np.ndarray) -> np.ndarray:
        """Indices of `raw_ids`; 0 for ids not here."""
        ids = np.asarray(raw_ids, dtype=np.int64)
        out = np.zeros(ids.shape, np.int64)
        if len(self._keys):
            at = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
            hit = self._keys[at] == ids
            out[hit] = self._vals[at[hit]]
        else:
            hit = np.zeros(ids.shape, bool)
        if self._recent and not hit.all():
            miss = np.flatnonzero(~hit)
            out.flat[miss] = [self._recent.get(i, 0) for i in ids.flat[miss].tolist()]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the sorted arrays (the dict holds at most a sixteenth as many entries)."""
        return int(self._keys.nbytes + self._vals.nbytes)
