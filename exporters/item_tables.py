"""What the service reads per item, computed by the exported graphs over a whole catalog: the item tower's vectors
(the FAISS index's) and the two token tables (service/pipeline/item_tokens.py), in chunks. One place for the build's
index step and the GPU measurement's grown catalog."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.backends.onnx import OnnxBackend
from service.contract import ITEM_TOWER, RANKER_ITEM
from service.pipeline.item_tokens import token_paths

CHUNK = 4096


@dataclass
class ItemTables:
    vectors: np.ndarray  # [N, tower_dim]: item i in row i - 1 (FAISS ids are the item indices)
    ranker: np.ndarray  # [N + 1, d_model]: row i = item i; row 0 (no item) zeros
    user: np.ndarray  # [N + 1, tower_dim]: the same rows

    def save_tokens(self, index_dir: Path) -> None:
        for path, table in zip(token_paths(index_dir), (self.ranker, self.user), strict=True):
            np.save(path, table)

    @property
    def token_bytes(self) -> int:
        return int(self.ranker.nbytes + self.user.nbytes)


def item_tables(backend: OnnxBackend, content: np.ndarray, model_idx: np.ndarray) -> ItemTables:
    """`content` [N, E] of items 1..N and the index each one's ID embedding has (0: none, an item the models never
    saw), through item_tower (vector, user token) and ranker_item (ranker token)."""
    vecs, ranker, user = [], [], []
    for a in range(0, len(content), CHUNK):
        feeds = {
            "content_emb": np.asarray(content[a : a + CHUNK], np.float32),
            "item_idx": np.asarray(model_idx[a : a + CHUNK], np.int64).reshape(-1, 1),
        }
        tower = backend.run(ITEM_TOWER, feeds)
        vecs.append(tower["item_vec"])
        user.append(tower["user_token"])
        ranker.append(backend.run(RANKER_ITEM, feeds)["item_token"])
    pad = [np.zeros((1, t[0].shape[1]), np.float32) for t in (ranker, user)]
    return ItemTables(np.concatenate(vecs), np.concatenate([pad[0], *ranker]), np.concatenate([pad[1], *user]))
