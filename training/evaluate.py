"""`falconrec eval`: leave-one-out test metrics for (a) the HSTU ranker over the full catalog, (b) the served
cascade (ONNX user tower -> FAISS top-N -> ONNX ranker -> top 10) and (c) SASRec, beside the paper's rows.

Protocol as in SASRec/HSTU: history = every item but the last, target = the last, scored against every
catalog item (no negative sampling, nothing filtered).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from exporters.faiss_index import INDEX_FILE
from service.artifacts import ArtifactPaths
from service.contract import RANKER_CANDIDATES, RANKER_HISTORY, USER_TOWER, Manifest
from service.onnx_backend import OnnxBackend
from training import train as T
from training.batches import left_pad
from training.data import Dataset
from training.embed import load_embeddings
from training.metrics import rank_metrics
from training.models import HSTURanker, SASRec

# HSTU paper / repository README, ML-1M, full-catalog leave-one-out (only the cells we cite).
PAPER_ROWS = {
    "SASRec (paper)": {"hr@10": 0.2853, "ndcg@10": 0.1603},
    "HSTU (paper)": {"hr@10": 0.3097, "ndcg@10": 0.1720},
    "HSTU-large (paper)": {"hr@10": 0.3294, "ndcg@10": 0.1893},
}


def cascade_ranks(
    ds: Dataset, users: list[int], emb16: np.ndarray, repo: Path, index_dir: Path, num_candidates: int, batch: int = 64
) -> np.ndarray:
    """Rank of the target in the served cascade's ordering; misses of recall rank after all recalled items."""
    manifest = Manifest.read(repo)
    be = OnnxBackend(repo, manifest.dims, providers=["CPUExecutionProvider"], intra_op_threads=0)
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    n = manifest.dims.max_len
    table = np.zeros((emb16.shape[0] + 1, emb16.shape[1]), np.float32)
    table[1:] = emb16
    ranks = []
    for a in tqdm(range(0, len(users), batch), desc="cascade eval", leave=False):
        ex = [ds.test_example(u) for u in users[a : a + batch]]
        items, valid = left_pad([e[0] for e in ex], n)
        ts, _ = left_pad([e[1] for e in ex], n)
        hist = {"hist_emb": table[items], "hist_item": items, "hist_valid": valid}
        uvec = be.run(USER_TOWER, hist)["user_vec"]
        _, cand = index.search(np.ascontiguousarray(uvec, dtype=np.float32), num_candidates)
        cand = np.where(cand < 0, 0, cand)
        h = be.run(RANKER_HISTORY, {**hist, "hist_ts": ts})
        scores = be.run(
            RANKER_CANDIDATES,
            {
                "hist_k": h["hist_k"],
                "hist_v": h["hist_v"],
                "hist_q": h["hist_q"],
                "hist_ts": ts,
                "hist_valid": valid,
                "query_ts": np.array([[e[3]] for e in ex], np.int64),
                "cand_emb": table[cand],
                "cand_item": cand,
            },
        )["scores"]
        scores = np.where(cand > 0, scores, -np.inf)
        for i, e in enumerate(ex):
            hit = np.flatnonzero(cand[i] == e[2])
            ranks.append(int((scores[i] > scores[i, hit[0]]).sum()) if len(hit) else 10**9)
    return np.array(ranks)


def evaluate(cfg_name: str, artifacts: Path, repo: Path, max_users: int | None = None, log=print) -> dict:
    paths = ArtifactPaths.for_config(cfg_name, artifacts)
    ds = Dataset.load(paths.data)
    emb16, _ = load_embeddings(paths.content_emb, ds.item_texts)
    table = T.content_table(emb16)
    manifest = Manifest.read(repo)
    users = [u for u in range(ds.num_users) if len(ds.seqs[u]) >= 3]
    if max_users:
        users = users[:max_users]
    L = manifest.dims.max_len
    torch.set_grad_enabled(False)
    results: dict[str, dict] = {}
    t = time.time()
    ranker = T.load_checkpoint(paths.ranker, HSTURanker)
    results["HSTU ranker, full catalog"] = T.evaluate_scorer(
        ds, users, "test", L, table, lambda h: T.ranker_scores_full(ranker, h, table), batch=128
    )
    log(f"ranker eval {time.time() - t:.0f}s")
    t = time.time()
    n_cand = min(manifest.num_candidates, ds.num_items)
    results[f"cascade: towers top-{n_cand} -> HSTU"] = rank_metrics(
        cascade_ranks(ds, users, emb16, repo, paths.index_dir, n_cand)
    )
    log(f"cascade eval {time.time() - t:.0f}s")
    t = time.time()
    sasrec = T.load_checkpoint(paths.sasrec, SASRec)
    results["SASRec (ours)"] = T.evaluate_scorer(
        ds, users, "test", L, table, lambda h: T.sasrec_scores_full(sasrec, h, table)
    )
    log(f"sasrec eval {time.time() - t:.0f}s")
    out = {
        "config": cfg_name,
        "dataset": ds.name,
        "users": len(users),
        "items": ds.num_items,
        "model_version": manifest.model_version,
        "results": results,
        "paper": PAPER_ROWS if ds.name == "ml1m" else {},
    }
    paths.eval.write_text(json.dumps(out, indent=2))
    (Path(artifacts) / "eval.json").write_text(json.dumps(out, indent=2))
    return out
