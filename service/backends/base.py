"""The narrow interface the pipeline depends on: run one named model on named numpy tensors.

Backends: in-process ONNX Runtime (service.backends.onnx) and Triton (service.backends.triton).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend could not answer (down, timed out); callers may fall back or degrade."""


class InferenceBackend(ABC):
    name: str = "abstract"

    @abstractmethod
    async def infer(
        self, model: str, inputs: dict[str, np.ndarray], timeout_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Outputs of `model` for `inputs` (names and dtypes from service.contract)."""

    @abstractmethod
    def describe(self) -> dict:
        """What runs where (providers, URLs), for /readyz and logs."""

    async def ready(self) -> bool:
        return True

    async def ensure_loaded(self, timeout_s: float) -> None:  # noqa: B027 - optional hook
        """Before a version swap: make sure the backend can run this version's models (Triton loads them)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass
