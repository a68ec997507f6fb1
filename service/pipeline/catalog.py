"""The served catalog: raw item ids <-> item indices (1..N), titles, and stored user histories.

Reads the dataset file the build writes (training.data.Dataset.save); numpy only. Items added live (POST
/v1/items) get the next indices, N+1, N+2, ...: those are their FAISS ids, but the models never learned an ID
embedding for them, so `model_index` maps them to 0, the "unknown ID" the models were trained with for
cold items (content embedding only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Catalog:
    raw_ids: np.ndarray  # [N] raw id of item index i+1
    titles: np.ndarray  # [N] str
    index_of: dict[int, int]  # raw id -> index
    user_histories: dict[int, tuple[np.ndarray, np.ndarray]]  # raw user id -> (raw item ids, ts)

    def __post_init__(self) -> None:
        # Dense raw-id -> index table, built once: to_index runs on every request for ~1,200 ids.
        self._lut = np.zeros(int(self.raw_ids.max(initial=0)) + 1, dtype=np.int64)
        self._lut[self.raw_ids] = np.arange(1, len(self.raw_ids) + 1)
        self.num_trained = len(self.raw_ids)  # indices above it were added live: no learned ID embedding
        self._far: dict[int, int] = {}  # live ids too large for the dense table

    def add_items(self, raw_ids: list[int], titles: list[str]) -> np.ndarray:
        """Append new items (ids not in the catalog); returns their indices. Called on the event loop only, and
        each array is replaced, never resized in place, so a request holding the old one stays consistent."""
        start = len(self.raw_ids) + 1
        idx = np.arange(start, start + len(raw_ids), dtype=np.int64)
        ids = np.asarray(raw_ids, np.int64)
        near = ids < max(2 * len(self._lut), 1 << 20)  # grow the dense table for ids of the catalog's magnitude
        lut = self._lut
        if near.any() and int(ids[near].max()) >= len(lut):
            lut = np.zeros(max(int(ids[near].max()) + 1, len(lut)), np.int64)
            lut[: len(self._lut)] = self._lut
        else:
            lut = lut.copy()
        lut[ids[near]] = idx[near]
        for r, i in zip(ids[~near].tolist(), idx[~near].tolist(), strict=True):
            self._far[r] = i
        self.titles = np.concatenate([self.titles, np.array(titles, dtype=str)])
        self.raw_ids = np.concatenate([self.raw_ids, ids])
        self._lut = lut
        self.index_of.update(zip(ids.tolist(), idx.tolist(), strict=True))
        return idx

    def model_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """The index the models take: 0 (unknown ID) for unknown and live-added items."""
        idx = self.to_index(raw_ids)
        return np.where(idx > self.num_trained, 0, idx)

    @property
    def num_items(self) -> int:
        return len(self.raw_ids)

    @classmethod
    def load(cls, path: Path, drop_last: int = 1) -> Catalog:
        """User histories keep all but the last `drop_last` events (the leave-one-out test item)."""
        z = np.load(path, allow_pickle=False)
        raw = z["item_raw_ids"].astype(np.int64)
        titles = np.array([t.split(" | ")[0] for t in z["item_texts"]])
        offsets = np.concatenate([[0], np.cumsum(z["lengths"])])
        items, times = z["items"], z["times"]
        hist = {}
        for u, a, b in zip(z["user_raw_ids"].tolist(), offsets[:-1], offsets[1:], strict=True):
            b = max(a, b - drop_last)
            hist[int(u)] = (raw[items[a:b] - 1], times[a:b].astype(np.int64))
        return cls(raw, titles, {int(r): i + 1 for i, r in enumerate(raw.tolist())}, hist)

    def to_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Model indices; 0 for ids the models never saw (cold: content embedding only)."""
        ids = np.asarray(raw_ids, dtype=np.int64)
        lut = self._lut
        inside = (ids >= 0) & (ids < len(lut))
        out = np.where(inside, lut[np.where(inside, ids, 0)], 0)
        if self._far and not inside.all():
            far = np.flatnonzero(~inside)
            out[far] = [self._far.get(int(i), 0) for i in ids[far]]
        return out
