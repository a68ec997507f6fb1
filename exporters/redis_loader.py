"""`falconrec load-redis`: user histories into Redis, versioned, pipelined,
idempotent. The new version is written in full before the one pointer key flips to it, so readers
never see a half-written set; older versions are deleted afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import redis
from tqdm.auto import tqdm

from service.artifacts import ArtifactPaths
from service.catalog import Catalog
from service.contract import Manifest
from service.stores.base import VERSION_KEY, hist_key, pack_history

CHUNK = 2000


def load_redis(
    url: str,
    config: str,
    artifacts: Path,
    repo: Path,
    max_history: int | None = None,
    keep_old: bool = False,
    progress: bool = True,
) -> dict:
    manifest = Manifest.read(repo)
    paths = ArtifactPaths.for_config(config, artifacts)
    catalog = Catalog.load(paths.data)
    version = manifest.embedding_version
    max_history = max_history or manifest.dims.max_len
    r = redis.Redis.from_url(url)
    r.ping()
    # Histories only: requests take no content embedding (the graphs read per-item tokens, written with the index).
    n_items = catalog.num_items
    users = list(catalog.user_histories.items())
    for a in tqdm(range(0, len(users), CHUNK), desc="redis histories", disable=not progress):
        pipe = r.pipeline(transaction=False)
        for u, (items, ts) in users[a : a + CHUNK]:
            pipe.set(hist_key(version, u), pack_history(items[-max_history:], ts[-max_history:]))
        pipe.execute()
    previous = r.get(VERSION_KEY)
    r.set(VERSION_KEY, version)  # the flip: one key, atomic
    r.set(
        f"falconrec:meta:{version}",
        json.dumps({"config": config, "model_version": manifest.model_version, "items": n_items, "users": len(users)}),
    )
    # Content embeddings (emb:{v}:*), which loads and ingestion workers before 2026-12-07 wrote and requests read:
    # nothing reads them now, and a reload of the same data keeps its version, so they go whatever the version.
    legacy = _unlink_matching(r, f"emb:{version}:*")
    deleted = 0
    if previous and previous.decode() != version and not keep_old:
        old = previous.decode()
        deleted = sum(_unlink_matching(r, f"{kind}:{old}:*") for kind in ("emb", "hist", "itemjob"))
        r.delete(f"falconrec:meta:{old}")
    return {
        "version": version,
        "items": n_items,
        "users": len(users),
        "previous": previous and previous.decode(),
        "deleted_old_keys": deleted,
        "deleted_embedding_keys": legacy,
    }


def _unlink_matching(r: redis.Redis, pattern: str) -> int:
    """Delete the keys matching `pattern`, scanned and unlinked in batches (never KEYS: it blocks the server)."""
    deleted, batch = 0, []
    for key in r.scan_iter(match=pattern, count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            deleted += r.unlink(*batch)
            batch = []
    if batch:
        deleted += r.unlink(*batch)
    return deleted
