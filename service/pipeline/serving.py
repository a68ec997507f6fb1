"""What the request path and the live path both read, one per process (built by service/components.py): the
settings, the manifest, the catalog, the models (with their fallback), the store, the index and the ranker tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.backends.base import BackendUnavailable, InferenceBackend
from service.catalog import Catalog
from service.contract import Manifest
from service.metrics import Metrics
from service.pipeline.deadline import Deadline
from service.pipeline.item_tokens import ItemTokens
from service.pipeline.retrieval import Retriever
from service.settings import Settings
from service.stores.base import FeatureStore

# Required stages (the user tower: without it there is nothing to answer) get this much time even when the
# budget is spent; optional ones (ranking) are bounded by what is left.
REQUIRED_STAGE_FLOOR_S = 0.2


@dataclass
class Serving:
    settings: Settings
    manifest: Manifest
    catalog: Catalog
    backend: InferenceBackend
    store: FeatureStore
    retriever: Retriever
    metrics: Metrics
    tokens: ItemTokens
    fallback: InferenceBackend | None = None

    def _fell_back(self) -> str:
        assert self.fallback is not None
        return f"{self.backend.name} unavailable; fell back to {self.fallback.name}"  # no class names out

    async def infer(
        self, model: str, inputs: dict, deadline: Deadline, degraded: list[str], required: bool = False
    ) -> dict[str, np.ndarray]:
        """One model call within the request's budget; on the fallback backend (and said so) when this one fails."""
        timeout = max(deadline.remaining(), REQUIRED_STAGE_FLOOR_S if required else 1e-3)
        try:
            return await self.backend.infer(model, inputs, timeout_s=timeout)
        except BackendUnavailable:
            # Only a failing backend falls back. A TimeoutError is this request's own budget running out:
            # running the model again elsewhere would only spend more past it.
            if self.fallback is None:
                raise
            if (reason := self._fell_back()) not in degraded:
                degraded.append(reason)
            return await self.fallback.infer(model, inputs)

    async def infer_unbudgeted(
        self, model: str, inputs: dict, timeout_s: float | None = None
    ) -> tuple[dict[str, np.ndarray], str | None]:
        """A call that belongs to no one request (a batch of several, an item added live): the outputs and, when
        the fallback answered, why."""
        try:
            return await self.backend.infer(model, inputs, timeout_s=timeout_s), None
        except BackendUnavailable:
            if self.fallback is None:
                raise
            return await self.fallback.infer(model, inputs, timeout_s=timeout_s), self._fell_back()
