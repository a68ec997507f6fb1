"""Turning per-user sequences into padded tensors. Histories are LEFT-padded: the newest item is last."""

from __future__ import annotations

import numpy as np


def left_pad(seqs: list[np.ndarray], length: int, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Stack the last `length` elements of each sequence, left-padded with 0. Returns (values, valid)."""
    out = np.zeros((len(seqs), length), dtype=dtype)
    valid = np.zeros((len(seqs), length), dtype=np.float32)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[i, length - len(s) :] = s
            valid[i, length - len(s) :] = 1.0
    return out, valid


def sample_windows(
    seqs: list[np.ndarray], times: list[np.ndarray], width: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A random contiguous window of up to `width` items per sequence, ending anywhere a full window fits.

    Long ML-1M users (up to ~2,300 ratings) would otherwise only ever train on their last `width` items.
    """
    ws, ts = [], []
    for s, t in zip(seqs, times, strict=True):
        n = len(s)
        end = n if n <= width else int(rng.integers(width, n + 1))
        ws.append(s[max(0, end - width) : end])
        ts.append(t[max(0, end - width) : end])
    return ws, ts
