"""Recall over item-tower vectors: FAISS (moved to GPU where faiss-gpu finds one), or for an exact index on the CPU
an exact scan in numpy (ExactScan)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import faiss
import numpy as np

from service.pipeline.top_k import top_k

log = logging.getLogger("falconrec.faiss")
INDEX_FILE = "items.faiss"  # written by exporters/faiss_index.py
INDEX_META = "index.json"
# Largest flat index scanned in numpy (measured to here; `kind = "auto"` builds HNSW above it); larger ones keep
# FAISS's search.
MAX_SCAN_ITEMS = 50_000
# Elements per matrix-vector product: OpenBLAS runs one below ~460,000 on the calling thread, a larger one on its
# pool as well (measured: 50,000 x 64 took 1.4x its wall time in CPU), whose threads spin beside the inference ones.
SCAN_BLOCK = 262_144


def in_sorted(values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Which of x are in `values` (sorted, unique): a binary search each. np.isin sorts both arrays on every call:
    5 % of the event loop's Python under load in a profile of the served path, 19.9 vs 15.4 us in isolation."""
    if len(values) == 0:
        return np.zeros(len(x), bool)
    at = np.searchsorted(values, x).clip(max=len(values) - 1)
    return values[at] == x


class ExactScan:
    """A flat inner-product index's search as matrix-vector products and a partial sort, the excluded items scored
    -inf first. FAISS keeps a heap of k for an exact search, and had to be asked for k = 1,000 plus the user's own
    items to filter after: on a 2-core EPYC, single-threaded CPU per search (250 excluded) 338 vs 106 us at
    ml1m's 3,883 items, 371 vs 189 at 10,000, 993 vs 488 at 50,000. Same items in the same order, ties aside. The
    vectors are a copy of the index's (12.8 MB at 50,000 x 64)."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.ids = np.asarray(ids, np.int64)
        self._row_of = np.full(0, -1, np.int64)
        self._index_rows()

    @classmethod
    def of(cls, index: faiss.Index) -> ExactScan | None:
        """The scan for an IndexIDMap2 over an inner-product IndexFlat on the CPU, else None (FAISS searches)."""
        base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
        if not isinstance(base, faiss.IndexFlat) or base.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        if base.ntotal > MAX_SCAN_ITEMS:
            return None
        return cls(base.reconstruct_n(0, base.ntotal), faiss.vector_to_array(index.id_map))

    def _index_rows(self) -> None:
        top = int(self.ids.max(initial=0))
        self._row_of = np.full(top + 1, -1, np.int64)
        self._row_of[self.ids[self.ids >= 0]] = np.flatnonzero(self.ids >= 0)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.vectors = np.concatenate([self.vectors, np.asarray(vectors, np.float32)])
        self.ids = np.concatenate([self.ids, np.asarray(ids, np.int64)])
        self._index_rows()

    def top(self, query: np.ndarray, n: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The n best ids and their scores for one query vector [d], best first, none of `exclude`."""
        s = np.empty(len(self.vectors), np.float32)
        q, step = np.asarray(query, np.float32), max(1, SCAN_BLOCK // self.vectors.shape[1])
        for a in range(0, len(s), step):  # blocks OpenBLAS runs on this thread (a larger gemv spins up its pool)
            np.matmul(self.vectors[a : a + step], q, out=s[a : a + step])
        if len(exclude):
            rows = self._row_of[exclude[(exclude >= 0) & (exclude < len(self._row_of))]]
            s[rows[rows >= 0]] = -np.inf
        top = top_k(s, n)
        top = top[s[top] > -np.inf]
        return self.ids[top], s[top]


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
        self._scan = ExactScan.of(self.index)
        if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            try:
                self._res = faiss.StandardGpuResources()
                self.index = faiss.index_cpu_to_gpu(self._res, 0, self.index)
                self.device = "gpu:0"
                self._scan = None
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

    def recall(self, user_vec: np.ndarray, n: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The top-n item indices and similarities for one user vector [1, d], best first, leaving out `exclude`
        (sorted, unique item indices: the user's own). Fewer than n when the index holds fewer."""
        if self._scan is not None:
            return self._scan.top(user_vec[0], n, exclude)
        ids, sims = self.search(user_vec, n + len(exclude))
        keep = (ids[0] > 0) & ~in_sorted(exclude, ids[0])
        return ids[0][keep][:n], sims[0][keep][:n]

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Live-added items (the index is an IndexIDMap2: ids are catalog indices). Called on the event loop,
        where every search runs too, so a search never sees a half-added batch."""
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, np.int64))
        if self._scan is not None:
            self._scan.add(vectors, ids)
        self.added += len(ids)

    def describe(self) -> dict:
        return {**self.meta, "device": self.device, "count": self.size, "added_live": self.added}
