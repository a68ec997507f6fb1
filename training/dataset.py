"""The Dataset every build trains on (interactions time-sorted per user, items 1..N, 0 = padding) and its
persistence in artifacts/<config>/data.npz. Below both the loader (training/dataset_files.py) and the sources
(training/data.py), which build one."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message says what was expected and where."""


@dataclass
class Dataset:
    """Interactions of every user, time-sorted, with item indices 1..num_items (0 = padding)."""

    name: str
    item_raw_ids: np.ndarray  # [num_items] raw id of item index i+1
    item_texts: list[str]  # [num_items] text fed to the content model
    user_raw_ids: np.ndarray  # [num_users]
    seqs: list[np.ndarray]  # per user: item indices (int64), time-ordered
    times: list[np.ndarray]  # per user: unix seconds (int64), same order
    meta: dict = field(default_factory=dict)
    # A string catalog's own ids (service/ids.py), aligned with item_raw_ids / user_raw_ids; None for integer ids.
    item_keys: np.ndarray | None = None
    user_keys: np.ndarray | None = None
    item_titles: list[str] | None = None  # from the items table's title column, when it has one

    def __post_init__(self) -> None:
        # The kinds travel with the dataset (data.npz `id_kinds`), so the service answers in the catalog's form.
        self.meta.setdefault("item_id_kind", "int" if self.item_keys is None else "str")
        self.meta.setdefault("user_id_kind", "int" if self.user_keys is None else "str")

    @property
    def num_items(self) -> int:
        return len(self.item_raw_ids)

    @property
    def num_users(self) -> int:
        return len(self.seqs)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(self.item_raw_ids.tobytes())
        for s, t in zip(self.seqs, self.times, strict=True):
            h.update(s.tobytes())
            h.update(t.tobytes())
        return h.hexdigest()[:16]

    # --- leave-one-out split -------------------------------------------------------------------
    def train_seq(self, u: int, keep_valid: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Everything except the validation and test items (`keep_valid`: except the test item only)."""
        end = -1 if keep_valid else -2
        return self.seqs[u][:end], self.times[u][:end]

    def valid_example(self, u: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(history items, history times, target item, target time) with the second-last item as target."""
        s, t = self.seqs[u], self.times[u]
        return s[:-2], t[:-2], int(s[-2]), int(t[-2])

    def test_example(self, u: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """History is everything but the last item; the last item is the target."""
        s, t = self.seqs[u], self.times[u]
        return s[:-1], t[:-1], int(s[-1]), int(t[-1])

    # --- persistence (artifacts/, never committed) --------------------------------------------
    def save(self, path: Path) -> None:
        lengths = np.array([len(s) for s in self.seqs], dtype=np.int64)
        np.savez_compressed(
            path,
            name=np.array(self.name),
            item_raw_ids=self.item_raw_ids,
            item_texts=np.array(self.item_texts, dtype=str),
            user_raw_ids=self.user_raw_ids,
            lengths=lengths,
            items=np.concatenate(self.seqs) if self.seqs else np.zeros(0, np.int64),
            times=np.concatenate(self.times) if self.times else np.zeros(0, np.int64),
            id_kinds=np.array([self.meta["item_id_kind"], self.meta["user_id_kind"]]),
            **self._optional_arrays(),
        )

    def _optional_arrays(self) -> dict[str, np.ndarray]:
        """Entries only a string catalog (keys) or an items table with titles has; readers check `z.files`."""
        out = {}
        if self.item_keys is not None:
            out["item_keys"] = np.asarray(self.item_keys, dtype=str)
        if self.user_keys is not None:
            out["user_keys"] = np.asarray(self.user_keys, dtype=str)
        if self.item_titles is not None:
            out["item_titles"] = np.array(self.item_titles, dtype=str)
        return out

    @classmethod
    def load(cls, path: Path) -> Dataset:
        z = np.load(path, allow_pickle=False)
        offsets = np.concatenate([[0], np.cumsum(z["lengths"])])
        items, times = z["items"], z["times"]
        seqs = [items[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        ts = [times[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        files = set(z.files)
        meta = {}
        if "id_kinds" in files:
            meta["item_id_kind"], meta["user_id_kind"] = (str(k) for k in z["id_kinds"])
        return cls(
            name=str(z["name"]),
            item_raw_ids=z["item_raw_ids"],
            item_texts=[str(x) for x in z["item_texts"]],
            user_raw_ids=z["user_raw_ids"],
            seqs=seqs,
            times=ts,
            meta=meta,
            item_keys=z["item_keys"] if "item_keys" in files else None,
            user_keys=z["user_keys"] if "user_keys" in files else None,
            item_titles=[str(x) for x in z["item_titles"]] if "item_titles" in files else None,
        )
