"""FAISS recall over item-tower vectors (moved to GPU where faiss-gpu finds one)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger("falconrec.faiss")
INDEX_FILE = "items.faiss"  # written by exporters/faiss_index.py
INDEX_META = "index.json"


def hnsw_graph(index: faiss.Index):
    """The HNSW graph under an IndexIDMap2 wrapper (SWIG hands out the base class: downcast), else None."""
    inner = getattr(index, "index", None)
    inner = faiss.downcast_index(inner) if inner is not None else index
    return getattr(inner, "hnsw", None)


class Retriever:
    def __init__(self, index_dir: Path, use_gpu: bool = True, threads: int | None = 1):
        # One OpenMP thread: a single-query search gains nothing from more, and FAISS's spinning OpenMP
        # workers fight the inference threads for the cores (measured on 2 cores beside ONNX Runtime work:
        # search p50 8 ms with 2 threads, 0.15 ms with 1). Process-wide setting; None leaves it alone.
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        path = Path(index_dir) / INDEX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: build the index first (`falconrec build`)")
        self.meta = json.loads((Path(index_dir) / INDEX_META).read_text())
        self.index = faiss.read_index(str(path))
        self.device = "cpu"
        self.added = 0
        self._hnsw = hnsw_graph(self.index)  # found once: search runs on every request
        if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            try:
                self._res = faiss.StandardGpuResources()
                self.index = faiss.index_cpu_to_gpu(self._res, 0, self.index)
                self.device = "gpu:0"
            except Exception as e:  # noqa: BLE001 - e.g. HNSW has no GPU version: stay on CPU
                log.warning("FAISS index stays on CPU: %s", e)
        log.info("FAISS %s index of %d items on %s", self.meta.get("kind"), self.index.ntotal, self.device)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, user_vec: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-n item indices (1..N) and similarities per row; -1 padding removed by the caller."""
        k = min(n, self.size)
        hnsw = self._hnsw
        if hnsw is not None and hnsw.efSearch < k:
            # HNSW returns at most efSearch good neighbours: efSearch 128 for k = 1000 recalled half of the exact
            # top 1,000 at 1M items (`falconrec bench-index`).
            hnsw.efSearch = k
        scores, ids = self.index.search(np.ascontiguousarray(user_vec, dtype=np.float32), k)
        return ids, scores

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Live-added items (the index is an IndexIDMap2: ids are catalog indices). Called on the event loop,
        where every search runs too, so a search never sees a half-added batch."""
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, np.int64))
        self.added += len(ids)

    def describe(self) -> dict:
        return {**self.meta, "device": self.device, "count": self.size, "added_live": self.added}
