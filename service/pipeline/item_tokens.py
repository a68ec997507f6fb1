"""Per-item input tokens, gathered instead of computed: the ranker's (contract.RANKER_ITEM, for candidates and
history items alike) and the user tower's (item_tower's `user_token`, for history items).

A token depends on the item alone (its content embedding and ID), so the build computes it once per item: a
request gathers rows of d_model (50 for ml1m) and tower_dim (64) floats where it used to fetch content
embeddings of E floats (576) and project each of them inside the graphs, so no content embedding is on the
request path. Items added live get their rows from ranker_item and item_tower when they join the catalog and
the index (service/ingest/live.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from service.contract import ITEM_TOKENS_FILE, USER_TOKENS_FILE
from service.pipeline.retrieval import INDEX_META


def token_paths(index_dir: Path) -> tuple[Path, Path]:
    """Where a build keeps the ranker's and the user tower's tables, beside the FAISS index."""
    return Path(index_dir) / ITEM_TOKENS_FILE, Path(index_dir) / USER_TOKENS_FILE


class TokenTable:
    """Row i = the token of item index i (row 0: no item, zeros)."""

    def __init__(self, table: np.ndarray):
        self._table = np.ascontiguousarray(table, dtype=np.float32)  # [capacity, d]
        self.rows = len(table)  # rows in use: 0 (no item) .. N

    @property
    def dim(self) -> int:
        return int(self._table.shape[1])

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Tokens [*idx.shape, d] of item indices 1..rows-1."""
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


class ItemTokens:
    """Both tables of one model version, always the same rows (added together)."""

    def __init__(self, ranker: np.ndarray, user: np.ndarray, model_version: str | None = None):
        if len(ranker) != len(user):
            raise ValueError(f"ranker tokens have {len(ranker)} rows, user tokens {len(user)}")
        self.ranker = TokenTable(ranker)
        self.user = TokenTable(user)
        self.model_version = model_version

    @classmethod
    def load(cls, index_dir: Path) -> ItemTokens:
        paths = token_paths(index_dir)
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} missing: this build predates precomputed item tokens; run `falconrec build` again "
                    "(it re-exports the graphs and rewrites the index folder, without retraining)"
                )
        meta = Path(index_dir) / INDEX_META
        version = json.loads(meta.read_text()).get("model_version") if meta.is_file() else None
        return cls(np.load(paths[0]), np.load(paths[1]), version)

    @property
    def rows(self) -> int:
        return self.ranker.rows

    def add(self, idx: np.ndarray, ranker: np.ndarray, user: np.ndarray) -> None:
        self.ranker.add(idx, ranker)
        self.user.add(idx, user)
