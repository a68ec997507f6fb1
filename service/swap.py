"""Hot swap (issue 25): follow the CURRENT version pointer (service/versions.py) without a restart or a failed request.

Every process polls CURRENT. When it names another version, the process loads that version beside the one it
serves (off the event loop), checks the two can share the store (the same text model, and a catalog that
extends or is extended by the served one, so live items keep their indices), warms it with the whole pipeline,
replays the items added live into it, then switches in one synchronous step: the next request runs on the new
version. A request runs entirely on the version it started on (it holds its Recommender: history K/V, candidates
and the answer's `model_version` all come from one), so in-flight requests finish on the old one, which is closed
once the longest budget has passed; its memory goes with its last reference.

With Triton and FALCONREC_TRITON_VERSIONED=true, each version is published into Triton's repository as Triton
version <n> of v<n> (`falconrec models add --triton-repo`, exporters/triton_versions.py) and every request names its
version's number; a swap first makes sure Triton has that version ready (asks it to load it in explicit model-control
mode, waits for its poll otherwise), and tries again later when it has not. Without that setting a swap is refused
with Triton (it would serve whatever version Triton chose).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np

from service.model import BuildMismatch, Model, load_model
from service.pipeline.recommender import Recommender
from service.pipeline.serving import Serving
from service.redact import for_log
from service.stores.memory import InProcessStore
from service.versions import VersionError, VersionStore

log = logging.getLogger("falconrec.swap")
RETIRE_MARGIN_S = 1.0  # after the longest budget, before the old version is closed (once no request uses it)
LOAD_TIMEOUT_S = 30.0  # how long a swap waits for Triton to have the new version's models ready
RETRY_S = 10.0  # a swap that failed for a passing cause (a file not copied yet, a timeout) is tried again


class SwapRefused(RuntimeError):
    """A version this process cannot swap to without a restart; the message says why."""


class VersionWatcher:
    def __init__(self, c: Any, versions: VersionStore, serving: str):
        self.c = c  # service.components.Components (not imported: components imports this module)
        self.versions = versions
        self.serving = serving
        self.refused: dict[str, str] = {}  # version -> why it cannot be served without a restart
        self._retry_at: dict[str, float] = {}  # version -> when to try again after a passing failure
        self.swaps = 0
        self._task: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._old = c.recommender

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="version-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.c.settings.version_poll_s)
            try:  # in a thread: the pointer may be a Redis key, read with the sync client
                target = await asyncio.to_thread(self.versions.current)
            except Exception as e:  # noqa: BLE001 - a filesystem or Redis hiccup: keep serving, look again
                log.warning("cannot read the current version: %s", for_log(e))
                continue
            self.refused = {v: why for v, why in self.refused.items() if v == target}  # a new target: try afresh
            if target is None or target == self.serving or target in self.refused:
                continue
            if time.monotonic() >= self._retry_at.get(target, 0.0):
                await self.swap(target)

    async def swap(self, vid: str) -> bool:
        t = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._load, vid)
            self._check(model)
            rec = await self._warm(model)
            try:
                replayed = await self.c.live.move_to(
                    rec.sv, check=lambda: self._check_catalog(model), switch=lambda: self._switch(rec, model)
                )
            except BaseException:
                await _close(rec)
                raise
        # VersionError: an id with no Triton number; BuildMismatch: parts that do not fit. Neither is ever servable.
        except (SwapRefused, VersionError, BuildMismatch) as e:
            self.refused[vid] = str(e)
            log.error("not swapping to version %s: %s", vid, e)
            return False
        except Exception as e:  # noqa: BLE001 - a passing cause: the served version stays, try again later
            self._retry_at[vid] = time.monotonic() + RETRY_S
            log.warning("swap to version %s failed (again in %.0f s): %s", vid, RETRY_S, for_log(e))
            return False
        old, self.serving = self._old, vid
        self.swaps += 1
        self._retry_at.pop(vid, None)
        log.info(
            "serving version %s (model %s) after %.2f s; %d live items replayed into it",
            vid, model.manifest.model_version, time.perf_counter() - t, replayed,
        )  # fmt: skip
        self._retire(old)
        return True

    def _load(self, vid: str) -> Model:
        """Off the event loop: the version's models."""
        return load_model(self.c.settings, self.versions.repository(vid), self.versions.artifacts(vid), vid)

    async def _warm(self, model: Model) -> Recommender:
        """The new version, warmed on an admission of its own: its cold first runs (~40 ms each) must neither hold
        the served version's slots nor inflate the hold time live requests are shed by; then it joins the shared one."""
        s = self.c.settings
        sv = Serving(s, model.manifest, model.catalog, model.backend, self.c.store, model.retriever,
                     self.c.metrics, model.tokens, model.fallback)  # fmt: skip
        rec = Recommender(sv)
        try:
            await model.backend.ensure_loaded(LOAD_TIMEOUT_S)  # Triton: this version's models ready (a passing failure)
            await rec.warmup()
        except BaseException:
            await _close(rec)
            raise
        rec.admission = self.c.recommender.admission
        return rec

    def _check(self, model: Model) -> None:
        s = self.c.settings
        if s.backend == "triton" and not s.triton_versioned:
            raise SwapRefused(
                "with Triton a version is served only where Triton has it: publish versions with `falconrec models "
                "add --triton-repo` and set FALCONREC_TRITON_VERSIONED=true, or restart to serve this one"
            )
        cur = self.c.recommender.sv
        # Items added live come with content embeddings from the served version's text model (the item log), which the
        # new version's graphs turn into its tokens: a version over another text model (or width) cannot take them
        # in and needs the store reloaded. More items (a retrain) are fine.
        new, old = model.manifest, cur.manifest
        if (new.embedding_model, new.dims.content_dim) != (old.embedding_model, old.dims.content_dim):
            raise SwapRefused(
                f"content embeddings from {new.embedding_model} ({new.dims.content_dim} wide) differ from the served "
                f"{old.embedding_model} ({old.dims.content_dim}): live items hold the served ones (reload, restart)"
            )
        self._check_catalog(model)

    def _check_catalog(self, model: Model) -> None:
        """Both catalogs give each item the same index: live items' indices stay valid. Checked
        again under the live data's lock, right before the switch: an item added meanwhile took the next index."""
        a, b = model.catalog.raw_ids, self.c.recommender.catalog.raw_ids
        m = min(len(a), len(b))
        if not np.array_equal(a[:m], b[:m]):
            raise SwapRefused("its catalog orders items differently from the served one (restart to serve it)")

    def _switch(self, rec: Recommender, model: Model) -> None:
        """The switch itself: synchronous, so no request sees half of it."""
        self._old = self.c.recommender
        if isinstance(self.c.store, InProcessStore):
            self.c.store.catalog = model.catalog  # its status counts the served catalog's items
        self.c.recommender = rec

    def _retire(self, old: Recommender) -> None:
        async def later() -> None:
            await asyncio.sleep(self.c.settings.max_budget_ms / 1000 + RETIRE_MARGIN_S)
            while old.inflight:  # a patient ScoreBatch user may still be queued on it
                await asyncio.sleep(0.1)
            await _close(old)

        task = asyncio.create_task(later())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def describe(self) -> dict:
        return {"version": self.serving, "swaps": self.swaps, "refused": dict(self.refused)}

    async def close(self) -> None:
        for task in [self._task, *self._retiring]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._task, *self._retiring] if t is not None], return_exceptions=True)


async def _close(rec: Recommender) -> None:
    """A version no request uses any more: its batcher, then its backends (their threads and sessions)."""
    await rec.close()
    await rec.sv.backend.close()
    if rec.sv.fallback is not None:
        await rec.sv.fallback.close()
