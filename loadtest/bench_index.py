"""`falconrec bench-index`: recall at catalog scale (up to 1M items), measured on this machine.

What changes with catalog size is retrieval: ranking costs per candidate (N = 1,000 whatever the catalog) and the
towers per request. So this grows the built catalog to `items` by perturbing its real content embeddings
(item j copies item j mod N plus Gaussian noise at `noise` x the per-dimension spread, so the copies spread out
instead of stacking up), runs the build's real item tower (ONNX Runtime) on them with the unknown ID, as the
service does for an item added live, and queries with the real user vectors of the build's users. Per index kind:
build seconds, bytes, single-thread search p50/p99 and recall@k against exact inner-product search.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from exporters.faiss_index import build_index
from service.artifacts import ArtifactPaths
from service.contract import ITEM_TOWER, USER_TOWER, Manifest, onnx_path
from service.pipeline.retrieval import hnsw_graph
from training.data import Dataset


def _session(repo: Path, model: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(onnx_path(repo, model)), so, providers=["CPUExecutionProvider"])


def synthetic_item_vectors(
    content: np.ndarray, repo: Path, items: int, noise: float = 0.5, seed: int = 0, chunk: int = 16384
) -> np.ndarray:
    """Item-tower vectors [items, T] for a catalog grown from the real one (see the module docstring)."""
    rng = np.random.default_rng(seed)
    real = content[1:]  # row 0 is padding
    spread = real.std(0, keepdims=True)
    tower = _session(repo, ITEM_TOWER)
    out: list[np.ndarray] = []
    for a in tqdm(range(0, items, chunk), desc="item tower", unit_scale=chunk, leave=False):
        j = np.arange(a, min(a + chunk, items))
        c = real[j % len(real)] + noise * spread * rng.standard_normal((len(j), real.shape[1]), dtype=np.float32)
        out.append(tower.run(None, {"content_emb": c, "item_idx": np.zeros((len(j), 1), np.int64)})[0])
    return np.concatenate(out)


def user_vectors(ds: Dataset, content: np.ndarray, repo: Path, users: int, max_len: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tower = _session(repo, USER_TOWER)
    # The user tower's per-item inputs, as the build writes them (USER_TOKENS_FILE): item_tower's second output.
    ids = np.arange(len(content), dtype=np.int64).reshape(-1, 1)
    feeds = {"content_emb": content.astype(np.float32), "item_idx": ids}
    (user_tokens,) = _session(repo, ITEM_TOWER).run(["user_token"], feeds)
    picks = rng.choice(ds.num_users, size=min(users, ds.num_users), replace=False)
    vecs = []
    for u in picks:
        items = np.asarray(ds.seqs[u][-max_len:], np.int64)[None]
        feeds = {"hist_token": user_tokens[items], "hist_valid": np.ones(items.shape, np.float32)}
        vecs.append(tower.run(None, feeds)[0])
    return np.concatenate(vecs)


def _search_ms(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    hnsw = hnsw_graph(index)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, k)  # as service.pipeline.retrieval searches it
    ids, times = [], []
    for q in queries:
        t = time.perf_counter()
        _, i = index.search(q[None], k)
        times.append((time.perf_counter() - t) * 1000)
        ids.append(i[0])
    return np.stack(ids), times


def index_scale_bench(
    config: str,
    artifacts: Path,
    repo: Path,
    items: int = 1_000_000,
    kinds: tuple[str, ...] = ("flat", "hnsw", "ivf"),
    queries: int = 200,
    k: int = 1000,
    log: Callable[[str], None] = print,
) -> dict:
    paths = ArtifactPaths.for_config(config, artifacts)
    ds = Dataset.load(paths.data)
    emb = np.load(paths.content_emb).astype(np.float32)  # [N, E], item index i in row i - 1
    content = np.vstack([np.zeros((1, emb.shape[1]), np.float32), emb])  # row = item index; 0 = padding
    dims = Manifest.read(repo).dims
    t = time.time()
    vecs = synthetic_item_vectors(content, repo, items)
    log(f"{items:,} item vectors ({vecs.shape[1]}-d) from the item tower in {time.time() - t:.0f}s")
    q = user_vectors(ds, content, repo, queries, dims.max_len)
    ids = np.arange(1, items + 1, dtype=np.int64)
    faiss.omp_set_num_threads(2)  # building uses both cores; search is timed on one, as the service runs it
    rows: dict[str, dict] = {}
    exact: np.ndarray | None = None
    for kind in kinds:
        faiss.omp_set_num_threads(2)
        t = time.time()
        index, _ = build_index(vecs, ids, kind=kind)
        build_s = time.time() - t
        faiss.omp_set_num_threads(1)
        found, times = _search_ms(index, q, k)
        if kind == "flat":
            exact = found
        row = {
            "build_s": build_s,
            "bytes": int(faiss.serialize_index(index).nbytes),
            "search_p50_ms": float(np.percentile(times, 50)),
            "search_p99_ms": float(np.percentile(times, 99)),
        }
        if exact is not None:
            row[f"recall@{k}"] = float(
                np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, exact, strict=True)])
            )
        rows[kind] = row
        log(f"{kind}: {row}")
    return {"items": items, "queries": len(q), "k": k, "rows": rows}
