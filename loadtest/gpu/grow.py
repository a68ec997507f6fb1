"""A built catalog grown to N items, for ranking N = 10,000 candidates on a catalog that has only 3,883 (ML-1M).

The extra items are near-copies of real ones (content embedding plus noise, as an item added live would be: no
learned ID embedding, model index 0), put through the build's own item tower and ranker_item graphs, so the
FAISS index, the ranker tokens and the catalog are exactly what serving such a catalog would hold. User
histories stay the real ones. Writes `<artifacts>/<name>/` and a model repository whose manifest names it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from exporters.faiss_index import build_index, save_index
from exporters.item_tables import item_tables
from service.artifacts import ArtifactPaths
from service.backends.onnx import OnnxBackend
from service.contract import Manifest


def grow(artifacts: Path, repo: Path, items: int, name: str, out_repo: Path, seed: int = 0) -> Path:
    manifest = Manifest.read(repo)
    src, dst = ArtifactPaths.for_config(manifest.config, artifacts), ArtifactPaths.for_config(name, artifacts)
    dst.index_dir.mkdir(parents=True, exist_ok=True)
    data = dict(np.load(src.data, allow_pickle=False))
    raw, texts = data["item_raw_ids"].astype(np.int64), data["item_texts"]
    n, extra = len(raw), items - len(raw)
    if extra <= 0:
        raise ValueError(f"the catalog already has {n} items (>= {items})")
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n, size=extra)
    emb = np.load(src.content_emb)
    noise = rng.standard_normal((extra, emb.shape[1])).astype(np.float32) * 0.1 * float(emb.astype(np.float32).std())
    emb = np.concatenate([emb, (emb[pick].astype(np.float32) + noise).astype(emb.dtype)])
    if not np.isfinite(emb).all():
        raise ValueError("grown content embeddings are not finite")
    data["item_raw_ids"] = np.concatenate([raw, raw.max() + 1 + np.arange(extra, dtype=np.int64)])
    data["item_texts"] = np.concatenate([texts, np.array([f"{texts[p]} (copy {i})" for i, p in enumerate(pick)])])
    np.savez_compressed(dst.data, **data)
    np.save(dst.content_emb, emb)
    meta = src.content_emb.with_suffix(".json")
    if meta.is_file():
        shutil.copy(meta, dst.content_emb.with_suffix(".json"))

    backend = OnnxBackend(repo, manifest.dims, providers=["CPUExecutionProvider"], workers=0)
    model_idx = np.concatenate([np.arange(1, n + 1), np.zeros(extra, np.int64)])  # grown items: unknown ID
    tables = item_tables(backend, emb, model_idx)
    index, kind = build_index(tables.vectors, np.arange(1, items + 1, dtype=np.int64), kind="flat")
    save_index(index, dst.index_dir, kind, manifest.model_version)
    tables.save_tokens(dst.index_dir)

    # The same graphs under a manifest that names the grown artifacts (the service serves the manifest's config).
    if out_repo.exists():
        shutil.rmtree(out_repo)
    shutil.copytree(repo, out_repo)
    replace(manifest, config=name).write(out_repo)
    (dst.root / "grown.json").write_text(json.dumps({"from": manifest.config, "items": items, "seed": seed}))
    return dst.root
