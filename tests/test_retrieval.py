"""Recall over a flat index: the exact scan (a matrix-vector product and a partial sort) returns what FAISS's own
search does, with the user's items left out, items added live, and more asked for than the index holds."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from exporters.faiss_index import build_index, save_index
from service.pipeline.retrieval import ExactScan, Retriever, in_sorted


def _faiss_recall(index: faiss.Index, q: np.ndarray, n: int, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sims, ids = index.search(q, n + len(exclude))
    keep = (ids[0] > 0) & ~in_sorted(exclude, ids[0])
    return ids[0][keep][:n], sims[0][keep][:n]


@pytest.fixture
def flat(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((3000, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index, kind = build_index(vecs, np.arange(1, 3001), kind="flat")
    save_index(index, tmp_path, kind, "v")
    return Retriever(tmp_path, use_gpu=False), index, rng


def test_the_exact_scan_recalls_what_faiss_does(flat):
    retriever, index, rng = flat
    assert retriever._scan is not None  # noqa: SLF001 - the flat index takes the scan
    for n, n_ex in [(1000, 300), (10, 0), (2990, 50), (5000, 100), (1, 2999)]:
        q = rng.standard_normal((1, 16)).astype(np.float32)
        exclude = np.unique(rng.integers(1, 3001, n_ex)) if n_ex else np.empty(0, np.int64)
        got_ids, got_sims = retriever.recall(q, n, exclude)
        want_ids, want_sims = _faiss_recall(index, q, n, exclude)
        assert np.allclose(got_sims, want_sims, atol=1e-5)
        # Same order, except near-ties (1e-7 apart: the two sum the products in different orders).
        differ = np.flatnonzero(got_ids != want_ids)
        assert set(got_ids[differ]) == set(want_ids[differ]), (n, n_ex)
        assert all(abs(got_sims[i] - want_sims[i]) < 1e-5 for i in differ)
        assert len(differ) <= 4, (n, n_ex, differ)
        assert len(got_ids) == min(n, 3000 - len(exclude))
        assert not np.isin(got_ids, exclude).any()


def test_items_added_live_are_recalled_and_excluded(flat):
    retriever, index, rng = flat
    new = rng.standard_normal((5, 16)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    retriever.add(new, np.arange(3001, 3006))
    q = new[2:3] * 3  # closest to item 3003
    ids, _ = retriever.recall(q, 10, np.empty(0, np.int64))
    assert ids[0] == 3003
    ids, _ = retriever.recall(q, 10, np.array([3003]))
    assert 3003 not in ids
    assert np.array_equal(ids, _faiss_recall(retriever.index, q, 10, np.array([3003]))[0])


def test_other_indexes_keep_faiss_search(tmp_path):
    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((500, 8)).astype(np.float32)
    index, kind = build_index(vecs, np.arange(1, 501), kind="hnsw")
    save_index(index, tmp_path, kind, "v")
    retriever = Retriever(tmp_path, use_gpu=False)
    assert retriever._scan is None  # noqa: SLF001
    exclude = np.array([3, 7, 11])
    ids, _ = retriever.recall(vecs[:1], 50, exclude)
    assert len(ids) == 50 and not np.isin(ids, exclude).any()


def test_the_scan_itself_on_ids_that_are_not_rows():
    """Ids need not be row + 1 (a rebuilt index, removals): exclusion goes through the ids."""
    vecs = np.eye(4, dtype=np.float32)
    scan = ExactScan(vecs, np.array([40, 10, 30, 20]))
    ids, sims = scan.top(np.array([1, 2, 3, 4], np.float32), 3, np.array([20, 99]))
    assert ids.tolist() == [30, 10, 40] and sims.tolist() == [3, 2, 1]


def test_the_scan_in_blocks_scores_every_row(monkeypatch):
    """The products run in blocks (a large one would spin up OpenBLAS's threads): blocks of 7 rows give the
    scores of one product over all rows."""
    from service.pipeline import retrieval

    rng = np.random.default_rng(2)
    vecs, q = rng.standard_normal((100, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    monkeypatch.setattr(retrieval, "SCAN_BLOCK", 7 * 8)
    ids, sims = ExactScan(vecs, np.arange(1, 101)).top(q, 100, np.empty(0, np.int64))
    want = vecs @ q
    assert np.allclose(sims, want[ids - 1], atol=1e-6) and np.array_equal(np.sort(ids), np.arange(1, 101))
    assert np.all(np.diff(sims) <= 0)
