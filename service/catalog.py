"""The served catalog: raw item ids <-> item indices (1..N), titles, and stored user histories.

Reads the dataset file the build writes (training.data.Dataset.save); numpy only. Items added live (POST
/v1/items) get the next indices, N+1, N+2, ...: those are their FAISS ids and their rows in the per-item token
tables; the models never learned an ID embedding for them (indices above `num_trained`), so their tokens were
computed with the "unknown ID" 0 the models were trained with for cold items (content embedding only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.id_index import IdIndex
from service.ids import Id, IdError, IdKind, raw_id


@dataclass
class Catalog:
    raw_ids: np.ndarray  # [N] raw id of item index i+1 (a view of a buffer with room to grow: see add_items)
    titles: list[str]  # [N]
    index_of: dict[int, int]  # raw id -> index
    user_histories: dict[int, tuple[np.ndarray, np.ndarray]]  # raw user id -> (raw item ids, ts)
    # A string catalog (service/ids.py): each item's own id, aligned with raw_ids; None when the ids are integers.
    keys: list[str] | None = None
    user_kind: IdKind = "int"

    def __post_init__(self) -> None:
        # Vectorised raw-id -> index lookups (to_index runs on every request for ~1,200 ids) in memory proportional
        # to the number of items: a dense table sized by the largest id let one POST of id 2^30 cost 8 GB.
        self._ids = IdIndex(self.raw_ids, np.arange(1, len(self.raw_ids) + 1))
        self._raw_buf = np.asarray(self.raw_ids, np.int64)
        self.num_trained = len(self.raw_ids)  # indices above it were added live: no learned ID embedding

    # --- the catalog's own ids <-> raw ids -----------------------------------------------------------------
    @property
    def item_kind(self) -> IdKind:
        return "int" if self.keys is None else "str"

    def item_raw(self, value: Id) -> int:
        return raw_id(value, self.item_kind)

    def user_raw(self, value: Id) -> int:
        return raw_id(value, self.user_kind)

    def item_key(self, value: Id) -> Id:
        """The id as answers give it back: a string catalog's ints as their decimal string (IdError if unusable)."""
        if self.keys is None:
            if isinstance(value, str):
                raise IdError("this catalog's ids are integers, got a string")
            return value
        return str(value) if isinstance(value, int) else value

    def external(self, idx: np.ndarray | list[int]) -> list[Id]:
        """The catalog's own ids of item indices (1..N)."""
        if self.keys is None:
            return [int(r) for r in self.raw_ids[np.asarray(idx, np.int64) - 1]]
        return [self.keys[i - 1] for i in np.asarray(idx, np.int64).tolist()]

    def add_items(self, raw_ids: list[int], titles: list[str], keys: list[str] | None = None) -> np.ndarray:
        """Append new items (ids not in the catalog); returns their indices. Called on the event loop only. Amortised
        O(1) per item: the id buffer doubles when full and new rows go past the end, so a request holding the old
        `raw_ids` view keeps reading the rows it saw."""
        n = len(self.raw_ids)
        idx = np.arange(n + 1, n + 1 + len(raw_ids), dtype=np.int64)
        if n + len(raw_ids) > len(self._raw_buf):
            grown = np.zeros(max(n + len(raw_ids), 2 * len(self._raw_buf)), np.int64)
            grown[:n] = self.raw_ids
            self._raw_buf = grown
        self._raw_buf[n : n + len(raw_ids)] = raw_ids
        self.titles.extend(titles)
        if self.keys is not None:
            if keys is None or len(keys) != len(raw_ids):
                raise ValueError("a string catalog's new items need their string ids")
            self.keys.extend(keys)
        self.raw_ids = self._raw_buf[: n + len(raw_ids)]
        self._ids.add(list(raw_ids), idx.tolist())
        self.index_of.update(zip(raw_ids, idx.tolist(), strict=True))
        return idx

    @property
    def lookup_bytes(self) -> int:
        """Bytes held for id lookups and ids (the buffers and the sorted index; the dicts are per item too)."""
        return int(self._raw_buf.nbytes + self._ids.nbytes)

    @property
    def num_items(self) -> int:
        return len(self.raw_ids)

    @classmethod
    def load(cls, path: Path, drop_last: int = 1) -> Catalog:
        """User histories keep all but the last `drop_last` events (the leave-one-out test item)."""
        z = np.load(path, allow_pickle=False)
        raw = z["item_raw_ids"].astype(np.int64)
        if "item_titles" in z.files:  # the items table's own titles (docs/data.md)
            titles = [str(t) for t in z["item_titles"]]
        else:  # the text up to its first " | " (ML-1M's "Title (Year) | Genres")
            titles = [str(t).split(" | ")[0] for t in z["item_texts"]]
        offsets = np.concatenate([[0], np.cumsum(z["lengths"])])
        items, times = z["items"], z["times"]
        hist = {}
        for u, a, b in zip(z["user_raw_ids"].tolist(), offsets[:-1], offsets[1:], strict=True):
            b = max(a, b - drop_last)
            hist[int(u)] = (raw[items[a:b] - 1], times[a:b].astype(np.int64))
        keys = [str(k) for k in z["item_keys"]] if "item_keys" in z.files else None
        if "id_kinds" in z.files:  # [item kind, user kind]; a retrained dataset keeps them without the user keys
            user_kind: IdKind = "str" if str(z["id_kinds"][1]) == "str" else "int"
        else:
            user_kind = "str" if "user_keys" in z.files else "int"
        return cls(raw, titles, {int(r): i + 1 for i, r in enumerate(raw.tolist())}, hist, keys, user_kind)

    def to_index(self, raw_ids: np.ndarray) -> np.ndarray:
        """Item indices (1..N, live items' included: FAISS ids and token-table rows); 0 for ids not in the catalog."""
        return self._ids.lookup(raw_ids)
