"""The composition root: every long-lived part of one server process, built, warmed and closed in one place.

The HTTP app (service/api/app.py) and the gRPC server hold one `Components` each process; the benchmarks and the
tests build their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.artifacts import ArtifactPaths, config_name
from service.auth import KeyRing
from service.backends.base import InferenceBackend
from service.backends.onnx import OnnxBackend
from service.catalog import Catalog
from service.contract import Manifest
from service.ingest.feed import ItemFeed, PipeFeed, RedisFeed
from service.ingest.live import LiveData
from service.metrics import Metrics
from service.pipeline.item_tokens import ItemTokens
from service.pipeline.recommender import Recommender
from service.pipeline.retrieval import Retriever
from service.pipeline.serving import Serving
from service.settings import Settings
from service.stores.base import FeatureStore
from service.stores.memory import InProcessStore
from service.stores.redis import RedisStore

log = logging.getLogger("falconrec.components")


@dataclass
class Components:
    settings: Settings
    manifest: Manifest
    backend: InferenceBackend
    fallback: InferenceBackend | None
    store: FeatureStore
    retriever: Retriever
    recommender: Recommender
    metrics: Metrics
    keys: KeyRing
    live: LiveData
    grpc_server: object | None = None

    @property
    def catalog(self) -> Catalog:
        return self.recommender.catalog


async def build_components(settings: Settings) -> Components:
    keys = KeyRing.from_settings(settings)  # first: a malformed key entry stops startup before any loading
    repo = Path(settings.model_repository)
    manifest = Manifest.read(repo)
    if manifest.config != config_name(settings.config):
        log.warning(
            "repository %s holds config %r, not %r: serving %r", repo, manifest.config, settings.config, manifest.config
        )
    paths = ArtifactPaths.for_config(manifest.config, settings.artifacts_dir)
    catalog = Catalog.load(paths.data)
    metrics = Metrics()
    onnx = OnnxBackend(
        repo,
        manifest.dims,
        settings.onnx_providers,
        settings.intra_op_threads,
        settings.inference_threads,
        trt_cache=paths.root / "trt_cache",
        tf32=settings.cuda_tf32,
    )
    backend: InferenceBackend = onnx
    fallback = None
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        backend = TritonBackend.from_settings(settings, manifest.dims)
        fallback = onnx if settings.triton_fallback else None
    store: FeatureStore
    if settings.redis_url:
        store = RedisStore(
            settings.redis_url,
            manifest.dims.content_dim,
            settings.redis_timeout_ms / 1000,
            settings.embedding_cache_items,
            settings.redis_retry_s,
            settings.history_cache_users,
        )
        await store.start()
    else:
        store = InProcessStore(catalog, np.load(paths.content_emb).astype(np.float32))
    retriever = Retriever(paths.index_dir, threads=settings.faiss_threads)
    if retriever.meta.get("model_version") != manifest.model_version:
        raise RuntimeError(
            f"FAISS index in {paths.index_dir} belongs to model {retriever.meta.get('model_version')}, "
            f"repository {repo} to {manifest.model_version}: rebuild (`falconrec build`)"
        )
    tokens = ItemTokens.load(paths.index_dir)
    if tokens.model_version != manifest.model_version or tokens.rows != catalog.num_items + 1:
        raise RuntimeError(
            f"ranker tokens in {paths.index_dir} do not match model {manifest.model_version} and its "
            f"{catalog.num_items} items: rebuild (`falconrec build`)"
        )
    sv = Serving(settings, manifest, catalog, backend, store, retriever, metrics, tokens, fallback)
    rec = Recommender(sv)
    await rec.warmup()
    live = LiveData(sv)
    feed: ItemFeed
    if isinstance(store, RedisStore):
        feed = RedisFeed(settings, manifest.dims.content_dim, live.apply, lambda: store.version, live.metrics)
    else:
        feed = PipeFeed(settings, manifest.dims.content_dim, live.apply, live.metrics)
    live.feed = feed
    await feed.start()  # replays the items added live so far (Redis), before the first request
    return Components(settings, manifest, backend, fallback, store, retriever, rec, metrics, keys, live)


async def close_components(c: Components) -> None:
    if c.grpc_server is not None:
        await c.grpc_server.stop(grace=1.0)
    await c.live.close()  # stops the worker this replica started
    await c.recommender.close()  # the batcher's dispatch loop, before the backend it calls
    await c.store.close()
    await c.backend.close()
    if c.fallback is not None:
        await c.fallback.close()
