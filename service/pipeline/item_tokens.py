"""The ranker's per-item input tokens (contract.RANKER_ITEM), gathered for candidates instead of computed.

A candidate's token depends on the item alone (its content embedding and ID), so the build computes it once
per item: a request gathers m rows of d_model floats (50 for ml1m) where it used to fetch m content
embeddings of E floats (576) and project each of them inside ranker_candidates. Items added live get their
row from ranker_item when they join the catalog and the index (service/ingest/live.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.contract import ITEM_TOKENS_FILE
from service.pipeline.retrieval import INDEX_META


class ItemTokens:
    def __init__(self, table: np.ndarray, model_version: str | None = None):
        self._table = np.ascontiguousarray(table, dtype=np.float32)  # [capacity, d]; row i = item index i
        self.rows = len(table)  # rows in use: 0 (no item) .. N
        self.model_version = model_version

    @classmethod
    def load(cls, index_dir: Path) -> ItemTokens:
        path = Path(index_dir) / ITEM_TOKENS_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} missing: this build predates precomputed ranker tokens; run `falconrec build` again "
                "(it re-exports the graphs and rewrites the index folder, without retraining)"
            )
        meta = Path(index_dir) / INDEX_META
        version = json.loads(meta.read_text()).get("model_version") if meta.is_file() else None
        return cls(np.load(path), version)

    @property
    def dim(self) -> int:
        return int(self._table.shape[1])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Tokens [len(idx), d] of item indices 1..rows-1."""
        return self._table.take(idx, axis=0)

    def add(self, idx: np.ndarray, tokens: np.ndarray) -> None:
        """Rows for items added live, whose indices continue the catalog's (rows, rows + 1, ...). Event loop only;
        the table grows by doubling into a new array, so a gather in flight keeps reading a consistent one."""
        idx = np.asarray(idx, np.int64)
        if len(idx) == 0:
            return
        if not np.array_equal(idx, np.arange(self.rows, self.rows + len(idx))):
            raise ValueError(f"live item indices {idx[:3].tolist()}... do not continue the table at {self.rows}")
        need = self.rows + len(idx)
        if need > len(self._table):
            grown = np.zeros((max(need, 2 * len(self._table)), self.dim), np.float32)
            grown[: self.rows] = self._table[: self.rows]
            self._table = grown
        self._table[self.rows : need] = tokens
        self.rows = need
