"""Turning per-user sequences into padded tensors. Histories are LEFT-padded: the newest item is last."""

from __future__ import annotations

from collections.abc import Sequence

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


class PackedSequences:
    """Every user's sequence in one left-padded matrix, so a training batch is a gather, not a Python loop.

    `windows` draws, per user, a random contiguous window of up to `width` items ending anywhere a full
    window fits (long ML-1M users, up to ~2,300 ratings, would otherwise only ever train on their last
    `width` items) and returns it left-padded: exactly what `left_pad` would give for that slice.
    """

    def __init__(self, seqs: Sequence[np.ndarray], times: Sequence[np.ndarray]):
        self.lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        width = int(self.lengths.max()) if len(seqs) else 1
        self.width = max(width, 1)
        self.items = np.zeros((len(seqs), self.width), np.int64)
        self.times = np.zeros((len(seqs), self.width), np.int64)
        for i, (s, t) in enumerate(zip(seqs, times, strict=True)):
            if len(s):
                self.items[i, self.width - len(s) :] = s
                self.times[i, self.width - len(s) :] = t

    def windows(
        self, users: np.ndarray, width: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(items, times, valid), each [len(users), width], left-padded."""
        n = self.lengths[users]
        # End (exclusive, in sequence coordinates) of each window: n when it fits, else uniform in [width, n].
        long = n > width
        end = n.copy()
        if long.any():
            end[long] = width + (rng.random(int(long.sum())) * (n[long] - width + 1)).astype(np.int64)
        # Column j of the window holds sequence position end - width + j; sequence position t sits at
        # matrix column self.width - n + t.
        cols = (self.width - n + end - width)[:, None] + np.arange(width)[None, :]
        valid = cols >= self.width - n[:, None]  # before the sequence's first item: padding
        cols = np.clip(cols, 0, self.width - 1)
        rows = users[:, None]
        items = np.where(valid, self.items[rows, cols], 0)
        times = np.where(valid, self.times[rows, cols], 0)
        return items, times, valid.astype(np.float32)
