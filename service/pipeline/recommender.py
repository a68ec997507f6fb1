"""The cascade (no torch): history -> per-item tokens -> user tower -> FAISS recall -> HSTU ranking with
M-FALCON (history K/V once per user, cached; candidates in microbatches, batched across requests) -> top K.

Every stage reads the request's Deadline. When time runs short, ranking covers fewer candidates or is skipped
(recall order), and the result says `degraded` with the reasons. Admission (admission.py) decides who runs; the
per-user stages and their caches are user_state.py's; the models and stores come from one Serving (serving.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import BackendUnavailable
from service.contract import RANKER_CANDIDATES, USER_TOWER_EXTEND
from service.errors import BadRequest
from service.pipeline.admission import Admission
from service.pipeline.batching import CandidateBatcher
from service.pipeline.deadline import Deadline, StageTimer
from service.pipeline.rank_plan import RESPONSE_RESERVE_S, RankPlanner
from service.pipeline.serving import REQUIRED_STAGE_FLOOR_S, Serving
from service.pipeline.top_k import top_k
from service.pipeline.user_state import History, UserState, UserStates

log = logging.getLogger("falconrec.pipeline")


def _retrieve(task: asyncio.Future) -> None:
    """Mark a background task's exception as seen (it is handled, or the result was not needed)."""
    if not task.cancelled():
        task.exception()


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique(x) for a short array: one sort and a mask (6 vs 18 us for 200 history rows)."""
    s = np.sort(x)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


# The stages every answer runs, ranked or not: what admission must leave room for (service/pipeline/admission.py).
BASE_STAGES = ("history", "user_state", "user_tower", "retrieval", "topk")


def query_time(query_ts: int | None, deadline: Deadline) -> int:
    """The time candidates are scored at: the request's, else its arrival (unix seconds). Not the newest
    history time: that put every candidate at dt = 0 from the last event, a time the model never trains on."""
    if query_ts is not None:
        return int(query_ts)
    return int(time.time() - deadline.elapsed())


@dataclass
class Result:
    items: list[dict]
    degraded: list[str] = field(default_factory=list)
    timings: StageTimer = field(default_factory=StageTimer)
    candidates_ranked: int = 0
    candidates_recalled: int = 0


class Recommender:
    def __init__(self, sv: Serving, admission: Admission | None = None):
        """`admission`: the one the version this replaces used, so that both count against one limit while the
        old one finishes its requests (service/swap.py)."""
        s = sv.settings
        self.sv = sv
        self.s = s
        self.manifest = sv.manifest
        self.dims = sv.manifest.dims
        self.catalog = sv.catalog
        self.tokens = sv.tokens
        self.retriever = sv.retriever
        self.store = sv.store
        self.metrics = sv.metrics
        self.users = UserStates(sv)
        self.admission = admission or Admission(s.max_active)
        self.inflight = 0  # requests using this version (in_use)
        self.num_candidates = s.num_candidates or sv.manifest.num_candidates
        self.microbatch = s.microbatch or sv.manifest.microbatch
        self.batcher = (
            CandidateBatcher(
                self._run_candidates,
                self.microbatch,
                parallel=max(1, s.inference_threads),  # inline (0) is one call at a time
                max_rows=s.rank_batch_max_rows,
                max_wait_s=s.rank_batch_wait_us / 1e6,
            )
            if s.rank_batching
            else None
        )
        self.planner = RankPlanner(self.batcher, self.microbatch)

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Held by a request from before it queues to its answer: a retired version closes only at zero."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    async def _run_candidates(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str | None]:
        """One batched ranker_candidates call for the batcher: no deadline of its own (its rows belong to
        several requests, each of which waits only its own budget), the fallback backend when this one fails."""
        return await self.sv.infer_unbudgeted(RANKER_CANDIDATES, inputs)

    async def warmup(self, rounds: int = 3) -> None:
        """Run the whole pipeline on a stored history before taking traffic: ONNX Runtime's first runs
        allocate its arenas and the first requests otherwise took ~40 ms (load-test plots, first second)."""
        histories = self.catalog.user_histories.values()
        items, ts = max(histories, key=lambda h: len(h[0]), default=(np.empty(0), np.empty(0)))
        if len(items) == 0:
            return
        history = list(zip(items[-self.dims.max_len :].tolist(), ts[-self.dims.max_len :].tolist(), strict=True))
        for _ in range(rounds):
            try:
                await self.recommend(None, history, 10, True, None, Deadline(5.0))
            except Exception as e:  # noqa: BLE001 - a cold start must not fail on warm-up
                log.warning("warm-up request failed: %r", e)
                return
        try:  # the tower's extension graph too, else its first run lands on the first returning user
            await self.users.warm_tower_extension(history)
        except Exception as e:  # noqa: BLE001
            log.warning("warm-up of %s failed: %r", USER_TOWER_EXTEND, e)
        self.admission.reset_base()

    async def rank(
        self,
        st: UserState,
        cand_idx: np.ndarray,
        query_ts: int,
        deadline: Deadline,
        degraded: list[str],
        required: bool = False,
    ) -> np.ndarray:
        """Scores for the candidates (item indices), in microbatches, each one isolated (M-FALCON): batched with
        other requests' (self.batcher), or this request's own calls run concurrently. `required`: the answer is
        these scores (/v1/score), so they get the required stages' floor of time, as the user tower does; else, with
        the batcher, a budget that runs out leaves the scores of the first microbatches ranked (fewer scores)."""
        assert st.kv is not None
        if not required:  # ranking's timer leaves the time its plan did: the response's, the loop's lateness
            deadline = deadline.less(RESPONSE_RESERVE_S + self.admission.lateness_s)
        base = {
            "hist_k": st.kv["hist_k"],
            "hist_v": st.kv["hist_v"],
            "hist_q": st.kv["hist_q"],
            "hist_ts": st.hist_ts,
            "hist_valid": st.hist_valid,
            "query_ts": np.array([[query_ts]], np.int64),
        }
        tokens = self.tokens.ranker.gather(cand_idx)  # [m, d]: content + ID already projected, per item at build time
        if self.batcher is not None:
            floor = REQUIRED_STAGE_FLOOR_S if required else 1e-3
            timeout = max(deadline.remaining(), floor)
            scores, reason = await self.batcher.score(base, tokens, timeout, partial=not required)
            if reason and reason not in degraded:
                degraded.append(reason)
            return scores
        bm = self.microbatch
        calls = [
            asyncio.ensure_future(
                self.sv.infer(
                    RANKER_CANDIDATES,
                    {**base, "cand_token": tokens[None, a : a + bm]},
                    deadline,
                    degraded,
                    required,
                )
            )
            for a in range(0, len(cand_idx), bm)
        ]
        try:
            outs = await asyncio.gather(*calls)
        except BaseException:
            # One microbatch failed (timeout): the others are not needed. Cancelling drops those still queued
            # for an inference worker, which other requests need under exactly this kind of load.
            for c in calls:
                c.add_done_callback(_retrieve)
                c.cancel()
            raise
        return np.concatenate([o["scores"][0] for o in outs])

    # --- the whole request ---------------------------------------------------------------------------
    async def recommend(
        self,
        user_id: int | None,
        history: list[tuple[int, int]] | None,
        k: int,
        exclude_seen: bool,
        num_candidates: int | None,
        deadline: Deadline,
        query_ts: int | None = None,
    ) -> Result:
        res = Result(items=[], timings=StageTimer(start=deadline.start))
        deg, tm = res.degraded, res.timings
        async with self.admission.admitted(deadline, answer=True) as slot:
            tm.mark("queue")  # arrival -> pipeline: parsing, validation, the event loop, a free slot
            if not slot:  # let in, but the queue drained too slowly: the shortest answer, without a slot
                deg.append("budget: no pipeline slot in time, recall order")
            h = await self.users.resolve_history(user_id, history, deadline, deg)
            self.users.note_store(deg)
            tm.mark("history")
            qts = query_time(query_ts, deadline)
            st = self.users.cached_user_state(h, qts, deg)
            tm.mark("user_state")
            if not slot:
                return await self._recall_and_rank(h, st, None, k, exclude_seen, num_candidates, deadline, qts, res)
            # The ranker's history pass needs only the history: it runs beside the user tower, recall and the
            # candidate fetch (the second inference worker), and ranking waits for it.
            kv_task = asyncio.ensure_future(self.users.history_kv(st, qts, deadline, deg))
            kv_task.add_done_callback(_retrieve)
            try:
                return await self._recall_and_rank(h, st, kv_task, k, exclude_seen, num_candidates, deadline, qts, res)
            finally:
                kv_task.cancel()  # no-op when ranking awaited it; frees the worker when ranking was skipped

    async def _recall_and_rank(
        self,
        h: History,
        st: UserState,
        kv_task: asyncio.Future | None,  # None: no slot, no ranking (recall order)
        k: int,
        exclude_seen: bool,
        num_candidates: int | None,
        deadline: Deadline,
        query_ts: int,
        res: Result,
    ) -> Result:
        deg, tm = res.degraded, res.timings
        user_vec = await self.users.user_vector(st, deadline, deg, h.user_id)
        tm.mark("user_tower")
        cand_idx, scores = self._recall(st, user_vec, num_candidates, exclude_seen)
        res.candidates_recalled = len(cand_idx)
        tm.mark("retrieval")
        if kv_task is not None:
            cand_idx, scores = await self._rank_in_time(st, kv_task, cand_idx, scores, k, deadline, query_ts, res)
        res.items = self._top_k(cand_idx, scores, k)
        tm.mark("topk")
        if kv_task is not None:  # learned from requests in the pipeline, which the base cost is about
            self.admission.note_base(sum(tm.stages.get(s, 0.0) for s in BASE_STAGES) / 1000.0)
        return res

    async def _rank_in_time(
        self,
        st: UserState,
        kv_task: asyncio.Future,
        cand_idx: np.ndarray,
        scores: np.ndarray,
        k: int,
        deadline: Deadline,
        query_ts: int,
        res: Result,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates and their scores after ranking as many as the rest of the budget affords (recall's order
        and similarities where it ranks none or fails). Planned again after the history pass, which ran beside
        recall: waiting for it can take part of what was left (answers that planned before it ran past the budget)."""
        deg, tm = res.degraded, res.timings
        n = len(cand_idx)
        need = min(k, n)  # fewer ranked than this would not fill the answer: recall order instead
        try:
            m = self._affordable(n, deadline)
            if m >= need:
                await kv_task
                tm.mark("ranker_history")
                m = min(m, self._affordable(n, deadline))
            cut = f"budget: ranked {m} of {n} candidates" if m >= need else "budget: ranking skipped, recall order"
            if m < n:
                deg.append(cut)
            if m < need or m == 0:
                return cand_idx, scores
            t0 = deadline.elapsed()
            try:
                ranked = await self.rank(st, cand_idx[:m], query_ts, deadline, deg)
            except TimeoutError:
                self.planner.learn(m, deadline.elapsed() - t0, timed_out=True)
                raise
            self.planner.learn(m, deadline.elapsed() - t0, timed_out=len(ranked) < m)
            if len(ranked) < m:  # time ran out with the first rows ranked (rows of >= k): keep those
                if cut in deg:
                    deg.remove(cut)
                m = len(ranked)
                deg.append(f"budget: ranked {m} of {n} candidates (time ran out)")
            res.candidates_ranked = m
            return cand_idx[:m], ranked
        except (TimeoutError, BackendUnavailable) as e:
            why = "timed out" if isinstance(e, TimeoutError) else "backend unavailable"
            deg.append(f"ranking failed ({why}); recall order")
            return cand_idx, scores
        finally:
            tm.mark("ranking")

    def _recall(
        self, st: UserState, user_vec: np.ndarray, num_candidates: int | None, exclude_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """The recalled candidates (item indices) and their similarities, the user's own items left out if asked
        (their indices: the history's token-table rows; an item the catalog lacks was dropped there and cannot be
        recalled)."""
        n = min(num_candidates or self.num_candidates, self.s.max_candidates, self.retriever.size)
        seen = sorted_unique(st.hist_rows) if exclude_seen else np.empty(0, np.int64)
        ids, sims = self.retriever.recall(user_vec, n, seen)
        return ids.astype(np.int64, copy=False), sims.astype(np.float32, copy=False)

    def _affordable(self, recalled: int, deadline: Deadline) -> int:
        """How many candidates ranking can take in what is left of the budget (rank_plan.py), less how late the
        loop's timers fire lately: ranking's own timer among them."""
        return self.planner.affordable(recalled, deadline.remaining() - self.admission.lateness_s)

    def _top_k(self, cand_idx: np.ndarray, scores: np.ndarray, k: int) -> list[dict]:
        top = top_k(scores, k)
        ids = self.catalog.external(cand_idx[top])  # the catalog's own ids, strings or integers
        return [
            {"item_id": item_id, "score": float(scores[i]), "title": str(self.catalog.titles[cand_idx[i] - 1])}
            for item_id, i in zip(ids, top, strict=True)
        ]

    async def score(
        self,
        user_id: int | None,
        history: list[tuple[int, int]] | None,
        item_ids: list[int],
        deadline: Deadline,
        query_ts: int | None = None,
        patient: bool = False,  # a batch user: queue for a slot as long as the caller waits (see admitted)
    ) -> tuple[np.ndarray, list[str], StageTimer]:
        """Ranker scores of given items (no recall, no filtering, no shrinking: the caller asked for these).

        Nothing here can be shrunk to fit the budget, so the ranker passes are required stages: with a budget too
        small for them (budget_ms 0.1 answered 503 "retry shortly", and no retry could help) they get the floor of
        time the user tower gets, and the answer says it ran over (degraded). Overload is still shed on arrival."""
        deg: list[str] = []
        tm = StageTimer(start=deadline.start)
        unknown = [i for i in item_ids if i not in self.catalog.index_of]
        if unknown:
            raise BadRequest("item_ids", f"unknown item ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        async with self.admission.admitted(deadline, patient):
            tm.mark("queue")
            h = await self.users.resolve_history(user_id, history, deadline, deg)
            self.users.note_store(deg)
            qts = query_time(query_ts, deadline)
            st = self.users.cached_user_state(h, qts, deg)
            tm.mark("user_state")
            await self.users.history_kv(st, qts, deadline, deg, required=True)
            tm.mark("ranker_history")
            # Candidates need no store: their ranker tokens are in memory (ItemTokens), live items' included.
            cand = self.catalog.to_index(np.array(item_ids, np.int64))
            scores = await self.rank(st, cand, qts, deadline, deg, required=True)
            tm.mark("ranking")
            if deadline.expired():
                deg.append(f"budget: scored after the {deadline.budget_s * 1000:g} ms budget ran out")
        return scores, deg, tm
