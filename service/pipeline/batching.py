"""Cross-request batching of candidate scoring: Triton's dynamic batcher, inside the process.

Each request splits its candidates into rows of at most `microbatch` (M-FALCON: a candidate sees the user's
history and itself, so which rows share a call cannot change a score). Rows wait in one FIFO queue; a call
goes out as soon as an inference worker is free, taking what has queued meanwhile, so an idle service
answers at once and a busy one makes fewer, larger ONNX Runtime calls instead of one per microbatch.

Rows of different users are stacked along the batch axis with their histories LEFT-padded to the longest:
the ranker counts positions from the oldest valid item, measures candidate-to-history distance from the
end, masks invalid keys and divides attention by the constant max_len, so padding changes nothing but
float summation order (tests: <= 1e-5 against the same request alone).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("falconrec.batching")

# Per-user inputs of ranker_candidates, as the history pass left them (batch dim 1).
USER_INPUTS = ("hist_k", "hist_v", "hist_q", "hist_ts", "hist_valid", "query_ts")
RunCall = Callable[[dict[str, np.ndarray]], Awaitable[tuple[dict[str, np.ndarray], str | None]]]


@dataclass(eq=False)
class _Row:
    user: dict[str, np.ndarray]
    cand_token: np.ndarray  # [m, d] (contract.RANKER_ITEM of each candidate)
    future: asyncio.Future


def stack_rows(rows: list[_Row]) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """One ranker_candidates input batch from rows, and where each row's scores are: (batch index, offset).

    Rows of one user (one request's microbatches) share a batch row, their candidates side by side along M:
    a candidate sees the history and itself only, so this changes no score, and one user's call runs on its
    own arrays without a copy of the history. Rows of different users go along the batch axis, histories
    left-padded (invalid, zero K/V) to the longest, candidates right-padded with zero tokens (dropped)."""
    groups: dict[int, list[_Row]] = {}
    for r in rows:
        groups.setdefault(id(r.user), []).append(r)
    where, tokens = [], []
    for b, group in enumerate(groups.values()):
        offset = 0
        for r in group:
            where.append((b, offset))
            offset += len(r.cand_token)
        tokens.append(group[0].cand_token if len(group) == 1 else np.concatenate([r.cand_token for r in group]))
    users = [g[0].user for g in groups.values()]
    if len(users) == 1:
        return {**{k: users[0][k] for k in USER_INPUTS}, "cand_token": tokens[0][None]}, where
    return _pad_users(users, tokens), where


def _pad_users(users: list[dict[str, np.ndarray]], tokens: list[np.ndarray]) -> dict[str, np.ndarray]:
    B = len(users)
    L = max(u["hist_k"].shape[2] for u in users)
    M = max(len(t) for t in tokens)
    k0, v0 = users[0]["hist_k"], users[0]["hist_v"]
    out = {
        "hist_k": np.zeros((B, k0.shape[1], L, k0.shape[3]), np.float32),
        "hist_v": np.zeros((B, v0.shape[1], L, v0.shape[3]), np.float32),
        "hist_q": np.empty((B, users[0]["hist_q"].shape[1]), np.float32),
        "hist_ts": np.zeros((B, L), np.int64),
        "hist_valid": np.zeros((B, L), np.float32),
        "query_ts": np.empty((B, 1), np.int64),
        "cand_token": np.zeros((B, M, tokens[0].shape[1]), np.float32),
    }
    for b, (u, t) in enumerate(zip(users, tokens, strict=True)):
        n = u["hist_k"].shape[2]
        out["hist_k"][b, :, L - n :] = u["hist_k"][0]
        out["hist_v"][b, :, L - n :] = u["hist_v"][0]
        out["hist_q"][b] = u["hist_q"][0]
        out["hist_ts"][b, L - n :] = u["hist_ts"][0]
        out["hist_ts"][b, : L - n] = u["hist_ts"][0, 0]  # masked; a real time keeps the bias lookups in range
        out["hist_valid"][b, L - n :] = u["hist_valid"][0]
        out["query_ts"][b] = u["query_ts"][0]
        out["cand_token"][b, : len(t)] = t
    return out


class CandidateBatcher:
    """Queue of candidate rows in front of `parallel` concurrent ranker_candidates calls.

    `run` executes one stacked call and returns its outputs and a degradation reason (a fallback backend),
    or raises. `max_wait_s` holds a call back that long for more rows to join (0: only what queued while the
    workers were busy, plus whatever arrives in the same event-loop turn).
    """

    def __init__(self, run: RunCall, microbatch: int, parallel: int, max_rows: int, max_wait_s: float = 0.0):
        self._run = run
        self.microbatch = microbatch
        self.parallel = max(1, parallel)
        self.max_rows = max(1, max_rows)
        self.max_wait_s = max_wait_s
        self._queue: deque[_Row] = deque()
        self._wake = asyncio.Event()
        self._free = asyncio.Semaphore(self.parallel)
        self._loop_task: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()
        self.calls = 0  # counters for /metrics and the bench: calls made, rows and users they carried
        self.rows = 0
        self.cand_cost_s = 10e-6  # EWMA: a call's wall time per candidate it carried (at least a microbatch's worth)
        self._inflight_cands = 0  # candidates in calls running now

    def backlog(self) -> tuple[float, float]:
        """(seconds until rows queued now start, seconds per candidate of their own): ranking m candidates takes
        about start + m x per. The rows queued and running ahead drain over `parallel` workers at the learned cost;
        a newcomer's own rows are planned at the cost of one worker even when idle workers will split them: under
        load the split bought nothing (the other core runs the event loop), and rankings planned as split took a
        median 1.8x, p90 3.6x their plan (0.97x, 1.8x for those planned behind a queue). Planned from this, ranking
        times out less than from an average over all loads, which learns a burst only later."""
        queued = sum(len(r.cand_token) for r in self._queue if not r.future.done())
        start = (queued + self._inflight_cands / 2) * self.cand_cost_s / self.parallel
        return start, self.cand_cost_s

    async def score(
        self, user: dict[str, np.ndarray], cand_token: np.ndarray, timeout_s: float | None = None, partial: bool = False
    ) -> tuple[np.ndarray, str | None]:
        """Scores [m] of this user's candidates, and a degradation reason if a fallback computed them. When
        `timeout_s` runs out: TimeoutError, or with `partial` the scores of the rows ranked by then from the first
        on (fewer than m; still TimeoutError when the first was not), so that a ranking the budget cuts short keeps
        its best-recalled candidates' scores instead of answering in recall order. Rows not sent yet are dropped."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._dispatch())
        loop = asyncio.get_running_loop()
        bm = self.microbatch
        rows = [_Row(user, cand_token[a : a + bm], loop.create_future()) for a in range(0, len(cand_token), bm)]
        self._queue.extend(rows)
        self._wake.set()
        futures = [r.future for r in rows]
        try:
            done, _ = await asyncio.wait(futures, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for f in futures:  # no-op for those done; those queued are dropped at dispatch
                f.cancel()
        failed = [f.exception() for f in done if f.exception() is not None]
        if failed:
            raise failed[0]
        outs = [f.result() for f in itertools.takewhile(lambda f: not f.cancelled(), futures)]
        if not outs or (len(outs) < len(rows) and not partial):
            raise TimeoutError
        reason = next((why for _, why in outs if why), None)
        return np.concatenate([s for s, _ in outs]), reason

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            await self._free.acquire()
            if self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
            else:
                await asyncio.sleep(0)  # rows submitted in this event-loop turn ride along
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()  # its request gave up
            if not self._queue:
                self._free.release()
                self._wake.clear()
                continue
            # Split what is queued over the free workers, so one idle request still uses both cores; under
            # load there is one free worker and everything queued goes in one call.
            live = [r for r in self._queue if not r.future.done()]
            free_now = 1 + self._free._value  # noqa: SLF001 - asyncio.Semaphore has no public count
            take = min(self.max_rows, -(-len(live) // free_now))
            batch = live[:take]
            self._queue = deque(live[take:])
            if not self._queue:
                self._wake.clear()
            cands = sum(len(r.cand_token) for r in batch)
            self._inflight_cands += cands
            task = asyncio.ensure_future(self._call(batch, cands))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _call(self, batch: list[_Row], cands: int) -> None:
        """One call over `batch` (`cands` candidates in all, counted in _inflight_cands until it ends)."""
        try:
            t0 = time.perf_counter()
            inputs, where = stack_rows(batch)
            outs, reason = await self._run(inputs)
            # Charged as at least one microbatch: a call over a few candidates costs about as much (fixed overhead).
            per = (time.perf_counter() - t0) / max(cands, self.microbatch)
            self.cand_cost_s = 0.8 * self.cand_cost_s + 0.2 * per
            scores = outs["scores"]
            self.calls += 1
            self.rows += len(batch)
            for (b, at), r in zip(where, batch, strict=True):
                if not r.future.done():
                    r.future.set_result((scores[b, at : at + len(r.cand_token)], reason))
        except Exception as e:  # noqa: BLE001 - every waiting request gets the failure, none hangs
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(e)
        finally:
            self._inflight_cands -= cands
            self._free.release()

    async def close(self) -> None:
        tasks = [t for t in (self._loop_task, *self._calls) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in self._queue:
            if not r.future.done():
                r.future.cancel()
        self._queue.clear()
