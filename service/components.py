"""The composition root: every long-lived part of one server process, built, warmed and closed in one place.

The HTTP app (service/api/app.py) and the gRPC server hold one `Components` each process; the benchmarks and the
tests build their own.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

from service.auth import KeyRing
from service.backends.base import BackendUnavailable, InferenceBackend
from service.catalog import Catalog
from service.contract import Manifest
from service.ingest.feed import ItemFeed, PipeFeed, RedisFeed
from service.ingest.live import LiveData
from service.loop_lag import LoopLag
from service.metrics import Metrics
from service.model import load_model
from service.pipeline.recommender import Recommender
from service.pipeline.retrieval import Retriever
from service.pipeline.serving import Serving
from service.settings import Settings
from service.stores.base import FeatureStore
from service.stores.memory import InProcessStore
from service.stores.redis import RedisStore
from service.swap import VersionWatcher
from service.versions import VersionStore

log = logging.getLogger("falconrec.components")


@dataclass
class Components:
    """The model-dependent parts (manifest, catalog, backend, index, tokens) hang off the recommender's Serving, so
    a version swap (service/swap.py) replaces them all in one assignment."""

    settings: Settings
    store: FeatureStore
    recommender: Recommender
    metrics: Metrics
    keys: KeyRing
    live: LiveData
    grpc_server: object | None = None
    watcher: object | None = None  # service.swap.VersionWatcher when serving from a versions directory
    loop_lag: LoopLag | None = None

    @property
    def catalog(self) -> Catalog:
        return self.recommender.catalog

    @property
    def manifest(self) -> Manifest:
        return self.recommender.manifest

    @property
    def backend(self) -> InferenceBackend:
        return self.recommender.sv.backend

    @property
    def fallback(self) -> InferenceBackend | None:
        return self.recommender.sv.fallback

    @property
    def retriever(self) -> Retriever:
        return self.recommender.sv.retriever


def served_paths(settings: Settings) -> tuple[Path, Path, str | None]:
    """(repository, artifacts dir, version id): the CURRENT version's when serving from a versions directory."""
    if settings.versions_dir is None:
        return Path(settings.model_repository), Path(settings.artifacts_dir), None
    vs = VersionStore(settings.versions_dir, settings.redis_url)
    vid = vs.current()
    if vid is None:
        raise RuntimeError(f"no current version in {settings.versions_dir}: `falconrec models promote <id>` first")
    return vs.repository(vid), vs.artifacts(vid), vid


async def build_components(settings: Settings) -> Components:
    keys = KeyRing.from_settings(settings)  # first: a malformed key entry stops startup before any loading
    repo, artifacts_dir, version = served_paths(settings)
    m = load_model(settings, repo, artifacts_dir, version)
    if settings.backend == "triton" and settings.triton_versioned and version is not None:
        try:  # the served version's number in Triton: say so at once if Triton lacks it (requests fall back)
            await m.backend.ensure_loaded(30.0)
        except BackendUnavailable as e:
            log.warning("%s: publish it with `falconrec models add --triton-repo`", e)
    metrics = Metrics()
    store: FeatureStore
    if settings.redis_url:
        store = RedisStore(
            settings.redis_url,
            settings.redis_timeout_ms / 1000,
            settings.redis_retry_s,
            settings.history_cache_users,
        )
        await store.start()
    else:
        store = InProcessStore(m.catalog)
    sv = Serving(settings, m.manifest, m.catalog, m.backend, store, m.retriever, metrics, m.tokens, m.fallback)
    rec = Recommender(sv)
    await rec.warmup()
    live = LiveData(sv)
    feed: ItemFeed
    if isinstance(store, RedisStore):
        feed = RedisFeed(settings, m.manifest.dims.content_dim, live.apply, lambda: store.version, live.metrics)
    else:
        feed = PipeFeed(settings, m.manifest.dims.content_dim, live.apply, live.metrics)
    live.feed = feed
    await feed.start()  # replays the items added live so far (Redis), before the first request
    # Everything built so far (catalog, id maps, models, warm-up's garbage collected) lives as long as the process:
    # out of the collector's view, a full collection no longer walks it. Measured under load at 200 req/s: a gen-2
    # collection held the event loop 48-64 ms, every request waiting behind it (issue 26).
    gc.collect()
    gc.freeze()
    c = Components(settings, store, rec, metrics, keys, live)
    c.loop_lag = LoopLag(metrics, report=rec.admission.note_lateness)  # one admission for every version
    c.loop_lag.start()
    if version is not None:
        c.watcher = VersionWatcher(c, VersionStore(settings.versions_dir, settings.redis_url), version)
        c.watcher.start()
    return c


async def close_components(c: Components) -> None:
    if c.loop_lag is not None:
        await c.loop_lag.close()
    if c.watcher is not None:
        await c.watcher.close()
    if c.grpc_server is not None:
        await c.grpc_server.stop(grace=1.0)
    await c.live.close()  # stops the worker this replica started
    await c.recommender.close()  # the batcher's dispatch loop, before the backend it calls
    await c.store.close()
    await c.backend.close()
    if c.fallback is not None:
        await c.fallback.close()
