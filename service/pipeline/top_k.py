"""The k best scores' positions in a stable descending sort's order, without sorting them all."""

from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """np.argsort(-scores, kind="stable")[:k], the same order ties included, without sorting all of them: a
    partition finds the k-th score, then only those above it and the first ties at it are sorted (23 vs 51 us
    for 10 of 1,000; this runs on the event loop for every answer). The answer's top k and recall's top n."""
    if k <= 0:
        return np.empty(0, np.int64)
    neg = -scores
    if k >= len(neg):
        return np.argsort(neg, kind="stable")
    t = np.partition(neg, k - 1)[k - 1]  # minus the k-th largest; NaN sorts last in both
    if t != t:  # fewer than k numbers: sort them all, as before
        return np.argsort(neg, kind="stable")[:k]
    above = np.flatnonzero(neg < t)
    chosen = np.concatenate([above, np.flatnonzero(neg == t)[: k - len(above)]])
    return chosen[np.argsort(neg[chosen], kind="stable")]
