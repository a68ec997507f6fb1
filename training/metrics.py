"""Ranking metrics from 0-based ranks of the held-out item (number of items scored strictly higher)."""

from __future__ import annotations

import numpy as np

CUTOFFS = (10, 50, 200)


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in CUTOFFS:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else 0.0
    hit10 = ranks < 10
    out["ndcg@10"] = float((hit10 / np.log2(ranks + 2)).mean()) if len(ranks) else 0.0
    out["users"] = int(len(ranks))
    return out
