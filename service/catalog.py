"""The served catalog: raw item ids <-> model item indices (1..N), titles, and stored user histories.

Reads the dataset file the build writes (training.data.Dataset.save); numpy only.
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
        inside = (ids >= 0) & (ids < len(self._lut))
        return np.where(inside, self._lut[np.where(inside, ids, 0)], 0)
