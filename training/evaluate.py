"""`falconrec eval`: leave-one-out test metrics on two protocols, beside the paper's rows.

Rows: popularity (calibration), our SASRec, our HSTU ranker over the full catalog, and the served cascade
(ONNX user tower -> FAISS top-N -> ONNX ranker -> top 10) at N = 200 and 1000.

Protocols (history = every item but the last, target = the last, ranked against the whole catalog):
- "paper": as the HSTU paper / reference code: all users, the user's own history items are not ranked
  (the cascade recalls past them, as serving does with `exclude_seen`).
- "unfiltered": history items compete with the target (our earlier numbers; ~1.3x lower HR@10 on ML-1M).
Model selection never looks at the test item: training stops on the second-last item (validation).

Query time, the time the ranker scores candidates at: our rows use the target event's timestamp, the analogue of
serving's request time. The reference code knows no such time and scores at the newest history event; the rows
marked "(query: newest history event)" use that convention, so each number has its like beside it. The split keeps
file order for events of one user with the same timestamp (a stable sort); Meta's preprocessing does not.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from service.artifacts import ArtifactPaths
from service.backends.onnx import OnnxBackend
from service.contract import RANKER_CANDIDATES, RANKER_HISTORY, USER_TOWER, Manifest
from service.pipeline.item_tokens import ItemTokens
from service.pipeline.retrieval import INDEX_FILE
from training import train as T
from training.batches import left_pad
from training.data import Dataset
from training.embed import load_embeddings
from training.metrics import rank_metrics
from training.models import HSTURanker, SASRec

PROTOCOLS = {"paper": True, "unfiltered": False}  # name -> history items excluded from the ranking
CASCADE_SIZES = (200, 1000)
NEWEST = " (query: newest history event)"  # the reference's query time (see the module's docstring)
TIE_RULE = "events of one user with equal timestamps keep their file order (stable sort)"


def newest_history_query(hist: tuple) -> tuple:
    """The history tensors with the query time set to the newest history event's (left-padded: the last column)."""
    emb, item, ts, valid, target, _ = hist
    return emb, item, ts, valid, target, ts[:, -1].clone()


# HSTU paper / repository README, ML-1M, full-catalog leave-one-out (only the cells we cite).
PAPER_ROWS = {
    "SASRec (paper)": {"hr@10": 0.2853, "ndcg@10": 0.1603},
    "HSTU (paper)": {"hr@10": 0.3097, "ndcg@10": 0.1720},
    "HSTU-large (paper)": {"hr@10": 0.3294, "ndcg@10": 0.1893},
}


def popularity_counts(ds: Dataset, split: str = "test") -> np.ndarray:
    """[N] interactions per item (column i = item i+1) over every user's history for `split`: what a
    most-popular recommender knows when it predicts the held-out items."""
    hist = [T.example(ds, u, split)[0] for u in range(ds.num_users)]
    flat = np.concatenate(hist) if hist else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=ds.num_items + 1)[1:].astype(np.int64)


def popularity_scorer(counts: np.ndarray, device: torch.device):
    # Ties broken by item index (a fixed order), so equal counts never rank the target optimistically.
    scores = torch.from_numpy(counts.astype(np.float64) - np.arange(len(counts)) / (len(counts) + 1.0)).to(device)
    return lambda h: scores.unsqueeze(0).expand(len(h[4]), -1).clone()


def cascade_ranks(
    ds: Dataset,
    users: list[int],
    repo: Path,
    index_dir: Path,
    num_candidates: int,
    exclude_history: bool,
    batch: int = 64,
    newest_query: bool = False,
    tops: list[np.ndarray] | None = None,
) -> np.ndarray:
    """Rank of the target in the served cascade's ordering; misses of recall rank after all recalled items.
    `tops`: each user's top 10 item indices are appended to it (the int8 check compares them across repositories)."""
    manifest = Manifest.read(repo)
    be = OnnxBackend(repo, manifest.dims, providers=["CPUExecutionProvider"], intra_op_threads=0)
    index = faiss.read_index(str(index_dir / INDEX_FILE))
    tokens = ItemTokens.load(index_dir)  # the graphs' per-item inputs, as the service reads them
    n = manifest.dims.max_len
    ranks = []
    for a in tqdm(range(0, len(users), batch), desc=f"cascade top-{num_candidates} eval", leave=False):
        part = users[a : a + batch]
        ex = [ds.test_example(u) for u in part]
        items, valid = left_pad([e[0] for e in ex], n)
        ts, _ = left_pad([e[1] for e in ex], n)
        qts = np.array([[e[1][-1] if newest_query else e[3]] for e in ex], np.int64)
        uvec = be.run(USER_TOWER, {"hist_token": tokens.user.gather(items), "hist_valid": valid})["user_vec"]
        seen = [np.setdiff1d(np.unique(e[0]), [e[2]]) if exclude_history else np.zeros(0, np.int64) for e in ex]
        width = min(index.ntotal, num_candidates + max(len(s) for s in seen))
        _, found = index.search(np.ascontiguousarray(uvec, dtype=np.float32), width)
        cand = np.zeros((len(ex), num_candidates), np.int64)
        for i, s in enumerate(seen):
            keep = found[i][(found[i] > 0) & ~np.isin(found[i], s)][:num_candidates]
            cand[i, : len(keep)] = keep
        hist = {"hist_token": tokens.ranker.gather(items), "hist_valid": valid, "hist_ts": ts, "query_ts": qts}
        h = be.run(RANKER_HISTORY, hist)
        scores = be.run(
            RANKER_CANDIDATES,
            {
                "hist_k": h["hist_k"],
                "hist_v": h["hist_v"],
                "hist_q": h["hist_q"],
                "hist_ts": ts,
                "hist_valid": valid,
                "query_ts": qts,
                "cand_token": tokens.ranker.gather(cand),
            },
        )["scores"]
        scores = np.where(cand > 0, scores, -np.inf)
        if tops is not None:
            tops.extend(np.take_along_axis(cand, np.argsort(-scores, axis=1, kind="stable")[:, :10], axis=1))
        for i, e in enumerate(ex):
            hit = np.flatnonzero(cand[i] == e[2])
            ranks.append(int((scores[i] > scores[i, hit[0]]).sum()) if len(hit) else 10**9)
    return np.array(ranks)


@torch.inference_mode()  # scoped: a process-wide set_grad_enabled(False) leaked into later training
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
    ranker = T.load_checkpoint(paths.ranker, HSTURanker)
    pop = popularity_scorer(popularity_counts(ds), table.device)
    scorers = {"popularity": (pop, 512)}
    # SASRec is an evaluation baseline: a build for serving (`falconrec models quick|full`) does not train it.
    sasrec = T.load_checkpoint(paths.sasrec, SASRec) if paths.sasrec.exists() else None
    if sasrec is not None:
        scorers["SASRec (ours)"] = (lambda h: T.sasrec_scores_full(sasrec, h, table), 256)
    else:
        log(f"no SASRec checkpoint in {paths.root}: its row is left out (`falconrec build` trains it)")
    scorers |= {
        "HSTU ranker, full catalog": (lambda h: T.ranker_scores_full(ranker, h, table), 128),
        "HSTU ranker, full catalog" + NEWEST: (
            lambda h: T.ranker_scores_full(ranker, newest_history_query(h), table),
            128,
        ),
    }
    results: dict[str, dict[str, dict]] = {proto: {} for proto in PROTOCOLS}
    for name, (fn, batch) in scorers.items():
        t = time.time()
        sas = T.training_catalog(sasrec, table) if sasrec is not None else contextlib.nullcontext()
        with T.training_catalog(ranker, table), sas:  # items embedded once
            ranks = T.scorer_ranks(ds, users, "test", L, table, fn, batch=batch)
        for proto, exclude in PROTOCOLS.items():
            m = results[proto][name] = rank_metrics(ranks[exclude])
            log(f"[{proto}] {name}: HR@10 {m['hr@10']:.4f} NDCG@10 {m['ndcg@10']:.4f} ({time.time() - t:.0f}s)")
    for proto, exclude in PROTOCOLS.items():
        rows = results[proto]
        runs = [(n, False) for n in CASCADE_SIZES] + [(CASCADE_SIZES[0], True)]
        for n, newest in runs:
            n = min(n, ds.num_items)
            t = time.time()
            name = f"cascade: towers top-{n} -> HSTU" + (NEWEST if newest else "")
            ranks = cascade_ranks(ds, users, repo, paths.index_dir, n, exclude, newest_query=newest)
            rows[name] = rank_metrics(ranks)
            log(
                f"[{proto}] {name}: HR@10 {rows[name]['hr@10']:.4f} NDCG@10 {rows[name]['ndcg@10']:.4f} "
                f"({time.time() - t:.0f}s)"
            )
    out = {
        "config": cfg_name,
        "dataset": ds.name,
        "users": len(users),
        "items": ds.num_items,
        "model_version": manifest.model_version,
        "protocols": {
            "paper": "full catalog, the user's history items excluded (HSTU paper / reference code)",
            "unfiltered": "full catalog, history items ranked too",
        },
        "query_time": "the target event's timestamp (serving: the request time); rows marked"
        + NEWEST
        + " score at the newest history event, as the reference code",
        "split": f"leave-one-out (last event = test, second-last = validation); {TIE_RULE}",
        "results": results,
        "paper": PAPER_ROWS if ds.name == "ml1m" else {},
    }
    paths.eval.write_text(json.dumps(out, indent=2))
    (Path(artifacts) / "eval.json").write_text(json.dumps(out, indent=2))
    return out
