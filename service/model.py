"""One model version, loaded: its manifest, catalog, backend (ONNX Runtime in-process, or Triton with ONNX as the
fallback), FAISS index and ranker tokens, checked to belong together. Used at start (service/components.py) and for
every version swap (service/swap.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service.artifacts import ArtifactPaths, config_name
from service.backends.base import InferenceBackend
from service.backends.onnx import OnnxBackend
from service.catalog import Catalog
from service.contract import Manifest
from service.pipeline.item_tokens import ItemTokens
from service.pipeline.retrieval import Retriever
from service.settings import Settings
from service.versions import triton_number

log = logging.getLogger("falconrec.model")


class BuildMismatch(RuntimeError):
    """A build whose parts do not belong together, or made by older code: loading it again cannot succeed."""


@dataclass
class Model:
    """What one model version brings: everything the store and the process-wide parts do not."""

    manifest: Manifest
    catalog: Catalog
    backend: InferenceBackend
    fallback: InferenceBackend | None
    retriever: Retriever
    tokens: ItemTokens


def load_model(settings: Settings, repo: Path, artifacts_dir: Path, version: str | None = None) -> Model:
    """Read one built version (its repository and artifacts) and check that its parts belong together. `version`:
    its id in a versions directory; with Triton every request then names that version's Triton number."""
    manifest = Manifest.read(repo)
    if manifest.config != config_name(settings.config):
        log.warning(
            "repository %s holds config %r, not %r: serving %r", repo, manifest.config, settings.config, manifest.config
        )
    paths = ArtifactPaths.for_config(manifest.config, artifacts_dir)
    catalog = Catalog.load(paths.data)
    tokens = _tokens(paths.index_dir, manifest, catalog)
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

        number = str(triton_number(version)) if version is not None and settings.triton_versioned else ""
        backend = TritonBackend.from_settings(settings, manifest.dims, number)
        fallback = onnx if settings.triton_fallback else None
    retriever = Retriever(paths.index_dir, threads=settings.faiss_threads)
    if retriever.meta.get("model_version") != manifest.model_version:
        raise BuildMismatch(
            f"FAISS index in {paths.index_dir} belongs to model {retriever.meta.get('model_version')}, "
            f"repository {repo} to {manifest.model_version}: rebuild (`falconrec build`)"
        )
    return Model(manifest, catalog, backend, fallback, retriever, tokens)


def _tokens(index_dir: Path, manifest: Manifest, catalog: Catalog) -> ItemTokens:
    try:
        tokens = ItemTokens.load(index_dir)
    except FileNotFoundError as e:  # a build older than the token tables: its graphs take content embeddings
        raise BuildMismatch(str(e)) from e
    if tokens.model_version != manifest.model_version or tokens.rows != catalog.num_items + 1:
        raise BuildMismatch(
            f"item tokens in {index_dir} do not match model {manifest.model_version} and its "
            f"{catalog.num_items} items: rebuild (`falconrec build`)"
        )
    return tokens
