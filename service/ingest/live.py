"""The live data path in the API process: events into user histories, and new items from the ingestion worker
into this replica's catalog, item tokens and FAISS index.

The LLM never runs here (no torch in the API process): POST /v1/items hands texts to the ingestion worker through
a feed (service.ingest.feed) and answers 202. The worker's content embeddings come back through the same feed;
`apply` runs the item tower and ranker_item (ONNX, no ID: the "unknown ID" embedding cold items were trained with),
then adds the item to the catalog, the token tables and FAISS in one event-loop step, so a request sees all of it
or none of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from service.catalog import Catalog
from service.contract import ITEM_TOWER, RANKER_ITEM
from service.errors import Conflict, Unavailable
from service.metrics import Metrics
from service.pipeline.serving import Serving
from service.stores.base import Appended, Event, StoreUnavailable

log = logging.getLogger("falconrec.live")
PENDING_TTL_S = 300.0
VISIBLE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def job_digest(item_id: int, text: str, title: str) -> str:
    """What makes two POSTs of an item the same job: a retry of it is answered as the first was, not queued twice."""
    return hashlib.blake2b(f"{item_id}\0{text}\0{title}".encode(), digest_size=12).hexdigest()


@dataclass(frozen=True)
class ItemJob:
    """One POST /v1/items entry on its way to the worker."""

    item_id: int  # raw id (service/ids.py)
    text: str
    title: str
    submitted_at: float  # unix time of the POST: every replica measures POST -> servable from it
    key: str | None = None  # the item's own id in a string-id catalog

    @property
    def digest(self) -> str:
        return job_digest(self.item_id, self.text, self.title)


@dataclass(frozen=True)
class IngestedItem:
    """What the worker sends back: the item's content embedding from the build's text model."""

    item_id: int
    title: str
    emb: np.ndarray  # float16 [E]
    submitted_at: float
    digest: str | None = None  # the job's (None from workers that predate it)
    key: str | None = None  # the item's own id in a string-id catalog


class NewItem(Protocol):
    """A validated new item (service.api.validation.ValidItem; the live path needs nothing else of it)."""

    item_id: int  # raw id
    key: str | None  # its own id in a string-id catalog
    text: str
    metadata: Mapping[str, object] | None


def title_of(item: NewItem) -> str:
    """What results show: metadata.title, else the text before ' | ' (as the build's catalog titles)."""
    title = (item.metadata or {}).get("title")
    return str(title) if title else item.text.split(" | ")[0].strip()[:200]


class LiveMetrics:
    def __init__(self, m: Metrics):
        self.events = Counter(
            "falconrec_events_total", "events by outcome (written, duplicate)", ["outcome"], registry=m.registry
        )
        self.items = Counter("falconrec_live_items_total", "items added live on this replica", registry=m.registry)
        self.visible = Histogram(
            "falconrec_item_visible_seconds",
            "POST /v1/items -> servable on this replica",
            buckets=VISIBLE_BUCKETS,
            registry=m.registry,
        )
        # The ingestion queue (with Redis: the whole jobs stream, every replica's jobs), measured every second.
        self.jobs_waiting = Gauge(
            "falconrec_ingest_jobs_waiting", "item jobs queued for the ingestion worker, not done", registry=m.registry
        )
        self.oldest_job = Gauge(
            "falconrec_ingest_oldest_job_seconds", "age of the oldest waiting item job", registry=m.registry
        )
        self.worker_restarts = Counter(
            "falconrec_ingest_worker_restarts_total",
            "ingestion workers this replica restarted after one exited",
            registry=m.registry,
        )


class LiveData:
    def __init__(self, sv: Serving):
        self.sv = sv  # the served version's; a swap replaces it (move_to), and with it the catalog, tokens, index
        self.s = sv.settings
        self.store = sv.store  # the same for every version
        self.metrics = LiveMetrics(sv.metrics)
        # Every item added live, by raw id: a new model version gets them replayed (move_to), computed by its models.
        self.applied: dict[int, IngestedItem] = {}
        self._lock = asyncio.Lock()  # one apply or swap at a time: no item lands on a version being replaced
        self.pending: dict[int, float] = {}  # item ids POSTed here, not applied yet
        # The job digest of each live item this replica knows (POSTed here, or applied with its digest): a POST of the
        # same job again is a retry (202, not queued twice), another text for the id a 409.
        self.digests: dict[int, str] = {}
        self.feed = None  # service.ingest.feed.ItemFeed, set by the app (it calls back into apply)

    @property
    def catalog(self) -> Catalog:
        return self.sv.catalog

    async def move_to(self, sv: Serving, check: Callable[[], None], switch: Callable[[], None]) -> int:
        """Under the lock no item is added meanwhile: `check` that `sv` can take over, replay the items added live
        into it (its towers compute their vectors and tokens), then `switch` (which makes `sv` the served one) with no
        await in between; returns the items replayed. If `check` or the replay raises, nothing was switched."""
        async with self._lock:
            check()
            items = [it for it in self.applied.values() if it.item_id not in sv.catalog.index_of]
            n = await self._apply(sv, items, replay=True) if items else 0
            switch()
            self.sv = sv
            return n

    def _check_shared_store(self) -> None:
        """With several server processes and no Redis, a write would reach one worker's in-process store only
        and the others would serve without it: refuse it, and say what to set."""
        if self.s.workers > 1 and not self.s.redis_url:
            raise Unavailable(
                f"writes need a shared store: this server runs {self.s.workers} worker processes, each with its own "
                "in-process store; set FALCONREC_REDIS_URL, or serve with --workers 1"
            )

    # --- events -----------------------------------------------------------------------------------------
    async def record_events(self, events: list[Event]) -> Appended:
        """Validated events (service.api.validation.check_events) into the store, all of them or none."""
        self._check_shared_store()
        ordered = sorted(events, key=lambda e: (e.user_id, e.ts))  # stable: same-time events keep request order
        try:
            out = await self.store.append_events(ordered, self.sv.manifest.dims.max_len, self.s.event_dedup_window)
        except StoreUnavailable as e:
            if not e.sent:  # refused before anything went out: the answer can say so
                raise Unavailable(f"user history store unavailable ({e.public}); nothing was written, retry") from e
            # A frozen Redis runs the script once it resumes: the batch may be written after this answer.
            raise Unavailable(
                f"user history store unavailable ({e.public}); the batch may have been written: retry with the same "
                "Idempotency-Key (or event_ids) and it is written once"
            ) from e
        self.metrics.events.labels("written").inc(out.written)
        self.metrics.events.labels("duplicate").inc(out.duplicates)
        return out

    # --- items ------------------------------------------------------------------------------------------
    def known(self, item_id: int) -> bool:
        if item_id in self.catalog.index_of:
            return True
        # A POST whose item never arrived (worker crashed, job dropped) blocks its id for a while, not for ever.
        posted = self.pending.get(item_id)
        return posted is not None and time.time() - posted < PENDING_TTL_S

    def jobs(self, items: Sequence[NewItem], now: float) -> list[ItemJob]:
        """Jobs for validated items (service.api.validation.check_items). A known or pending id is a 409, unless the
        request repeats the job that claimed it (a retry: accepted again, queued once)."""
        jobs = [ItemJob(it.item_id, it.text, title_of(it), now, it.key) for it in items]
        for i, j in enumerate(jobs):
            if self.known(j.item_id) and self.digests.get(j.item_id) != j.digest:
                own = j.item_id if j.key is None else repr(j.key)
                raise Conflict(f"items.{i}.item_id", f"item {own} already exists or is being added (item {i})")
        return jobs

    async def submit(self, jobs: list[ItemJob]) -> None:
        """Queue the jobs whose ids are not known here yet (the others are retries of jobs queued before)."""
        self._check_shared_store()
        if self.feed is None:
            raise Unavailable("item ingestion is not available on this replica")
        fresh = [j for j in jobs if not self.known(j.item_id)]
        for j in fresh:
            self.pending[j.item_id] = j.submitted_at
            self.digests[j.item_id] = j.digest
        try:
            if fresh:
                await self.feed.submit(fresh)
        except BaseException:
            for j in fresh:
                self.pending.pop(j.item_id, None)
                self.digests.pop(j.item_id, None)
            raise

    async def apply(self, items: list[IngestedItem]) -> int:
        """Make ingested items servable here; items already in the catalog are skipped (replays, duplicates)."""
        async with self._lock:
            return await self._apply(self.sv, items)

    async def _apply(self, sv: Serving, items: list[IngestedItem], replay: bool = False) -> int:
        fresh: dict[int, IngestedItem] = {}
        for it in items:
            if it.item_id not in sv.catalog.index_of:
                fresh.setdefault(it.item_id, it)
        if not fresh:
            return 0
        new = list(fresh.values())
        emb = np.stack([it.emb for it in new]).astype(np.float32)
        tower = await self._per_item(sv, ITEM_TOWER, emb)
        toks = (await self._per_item(sv, RANKER_ITEM, emb))["item_token"]
        # After the awaits: another apply may have added some of these meanwhile.
        cat = sv.catalog
        keep = [i for i, it in enumerate(new) if it.item_id not in cat.index_of]
        new, toks = [new[i] for i in keep], toks[keep]
        vecs, user_toks = tower["item_vec"][keep], tower["user_token"][keep]
        if not new:
            return 0
        ids = np.array([it.item_id for it in new], np.int64)
        idx = np.arange(cat.num_items + 1, cat.num_items + 1 + len(new), dtype=np.int64)
        # One synchronous step (no await): catalog, item tokens, FAISS. A request sees all of it or none.
        keys = [it.key or str(it.item_id) for it in new] if cat.keys is not None else None
        got = cat.add_items(ids.tolist(), [it.title for it in new], keys)
        assert np.array_equal(got, idx)
        sv.tokens.add(idx, toks, user_toks)
        sv.retriever.add(vecs, idx)
        self.applied.update((it.item_id, it) for it in new)
        if replay:  # into a new version: not new to anyone, nothing to measure
            return len(new)
        now = time.time()
        for it in new:
            self.pending.pop(it.item_id, None)
            if it.digest is not None:
                self.digests[it.item_id] = it.digest
            self.metrics.visible.observe(max(now - it.submitted_at, 0.0))
        self.metrics.items.inc(len(new))
        return len(new)

    @staticmethod
    async def _per_item(sv: Serving, model: str, emb: np.ndarray) -> dict[str, np.ndarray]:
        """A per-item graph (item tower, ranker token) on new items' content, with the unknown ID (index 0)."""
        inputs = {"content_emb": emb, "item_idx": np.zeros((len(emb), 1), np.int64)}
        return (await sv.infer_unbudgeted(model, inputs, timeout_s=10.0))[0]

    def problem(self) -> str | None:
        """Why accepted items are not becoming servable (for /readyz), or None."""
        return self.feed.problem() if self.feed is not None else None

    def status(self) -> dict:
        return {
            "live_items": self.catalog.num_items - self.catalog.num_trained,
            "pending_here": len(self.pending),
            "feed": self.feed.describe() if self.feed is not None else None,
        }

    async def close(self) -> None:
        if self.feed is not None:
            await self.feed.close()
