"""The direct-mapped embedding cache in front of Redis: hits, evictions, versions, bounds."""

from __future__ import annotations

import numpy as np

from service.embedding_cache import EmbeddingCache


def _rows(ids, dim=4):
    return np.stack([np.full(dim, i, np.float16) for i in ids])


def test_round_trip_and_misses():
    c = EmbeddingCache(100, 4)
    c.put("v1", np.array([3, 7, 50]), _rows([3, 7, 50]))
    out, found = c.get("v1", np.array([7, 8, 3, 50, 3]))
    assert found.tolist() == [True, False, True, True, True]
    assert out[:, 0].tolist() == [7, 0, 3, 50, 3] and out.dtype == np.float32
    assert (c.hits, c.misses, len(c)) == (4, 1, 3)


def test_ids_sharing_a_slot_evict_each_other_never_alias():
    c = EmbeddingCache(10, 4)
    c.put("v1", np.array([5]), _rows([5]))
    c.put("v1", np.array([15]), _rows([15]))  # same slot: 5 is evicted, and must not be served as 15
    out, found = c.get("v1", np.array([5, 15]))
    assert found.tolist() == [False, True] and out[1, 0] == 15
    assert len(c) == 1  # bounded by capacity


def test_new_version_drops_everything_and_negative_ids_never_hit():
    c = EmbeddingCache(10, 4)
    c.put("v1", np.array([1, 2, -1]), _rows([1, 2, 9]))
    assert c.get("v1", np.array([-1]))[1].tolist() == [False]
    assert c.get("v2", np.array([1, 2]))[1].tolist() == [False, False]
    assert c.get("v1", np.array([1]))[1].tolist() == [False]  # switching back does not resurrect rows


def test_capacity_zero_caches_nothing():
    c = EmbeddingCache(0, 4)
    c.put("v1", np.array([1]), _rows([1]))
    out, found = c.get("v1", np.array([1, 2]))
    assert not found.any() and out.shape == (2, 4) and len(c) == 0


def test_memory_grows_with_the_rows_written_not_in_huge_pages():
    """Issue 22: the table is reserved lazily; a few rows written at scattered slots must not commit 2 MiB each (numpy's
    huge-page advice did, and the kernel's compaction stalled the event loop for up to ~270 ms in a burst of adds)."""
    import os

    def rss_mib() -> float:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    cache = EmbeddingCache(100_000, 576)  # 230 MB reserved
    before = rss_mib()
    ids = np.arange(100, dtype=np.int64) * 997  # scattered over the table: 100 different 2 MiB regions
    cache.put("v", ids, np.ones((100, 576), np.float32))
    assert rss_mib() - before < 20  # 4 KiB pages: ~1 MB; huge pages: ~200 MB
    rows, found = cache.get("v", ids)
    assert found.all() and (rows == 1).all()
