"""Triton backend: the same models and tensors (service.contract) over tritonclient, gRPC or HTTP.

Each call carries a timeout inside the request's budget. After a failure the backend is marked down
for `retry_s` so later requests go straight to the fallback instead of paying a connect timeout each.
Candidate microbatches arrive as separate requests, so Triton's dynamic batcher can merge them.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from service.backends.base import BackendUnavailable, InferenceBackend
from service.contract import TRITON_DTYPES, ModelDims, model_specs
from service.redact import for_log, public_reason

log = logging.getLogger("falconrec.triton")


class TritonBackend(InferenceBackend):
    name = "triton"

    def __init__(
        self,
        url: str,
        dims: ModelDims,
        protocol: str = "grpc",
        timeout_s: float = 1.0,
        retry_s: float = 2.0,
        model_version: str = "",
    ):
        """`model_version`: the Triton version every call names ("" lets Triton choose: a single-version
        repository); a versions directory serves v<n> as Triton version <n> (exporters/triton_versions.py)."""
        if protocol == "grpc":
            import tritonclient.grpc.aio as tc
        elif protocol == "http":
            import tritonclient.http.aio as tc
        else:
            raise ValueError(f"triton protocol must be grpc or http, not {protocol!r}")
        self.tc = tc
        self.url, self.protocol = url, protocol
        self._client = None  # made on first use, in the event loop: a swap loads a version in a worker thread
        self.specs = model_specs(dims)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.model_version = model_version
        self.down_until = 0.0
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings, dims: ModelDims, model_version: str = "") -> TritonBackend:
        return cls(
            settings.triton_url,
            dims,
            settings.triton_protocol,
            settings.triton_timeout_ms / 1000,
            settings.triton_retry_s,
            model_version,
        )

    @property
    def client(self):  # noqa: ANN201 - tritonclient's grpc.aio or http.aio InferenceServerClient
        if self._client is None:
            self._client = self.tc.InferenceServerClient(url=self.url)
        return self._client

    async def ensure_loaded(self, timeout_s: float) -> None:
        """Every model at this backend's version ready in Triton, within `timeout_s` in all. Triton in explicit
        model-control mode is asked to load each model again (it then picks up the new version directory); in poll
        mode it finds the directory itself and this waits. Raises BackendUnavailable naming what is not ready."""
        missing = list(self.specs)
        asked: set[str] = set()
        try:
            async with asyncio.timeout(timeout_s):
                while missing:
                    ready = await asyncio.gather(*(self._ready(m) for m in missing))
                    missing = [m for m, ok in zip(missing, ready, strict=True) if not ok]
                    for m in (m for m in missing if m not in asked):
                        asked.add(m)
                        try:
                            await self.client.load_model(m)
                        except Exception as e:  # noqa: BLE001 - poll mode refuses explicit loads: wait for the poll
                            log.info("triton load_model(%s) for version %s: %s", m, self.model_version, for_log(e))
                    if missing:
                        await asyncio.sleep(0.2)
        except TimeoutError:
            pass
        if missing:
            raise BackendUnavailable(f"triton has no ready version {self.model_version} of {', '.join(missing)}")

    async def _ready(self, model: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.is_model_ready(model, self.model_version), 2.0))
        except Exception:  # noqa: BLE001 - not there yet, or Triton away: the caller's deadline decides
            return False

    def _down(self, e: BaseException) -> None:
        if time.monotonic() >= self.down_until:
            log.warning("triton at %s unavailable: %s", self.url, for_log(e))
        self.down_until = time.monotonic() + self.retry_s
        self.last_error = public_reason(e)  # shown in /readyz: no class name or address

    async def infer(self, model, inputs, timeout_s=None):
        if time.monotonic() < self.down_until:
            raise BackendUnavailable(self.last_error or "triton marked down")
        spec = self.specs[model]
        ins = []
        for t in spec.inputs:
            arr = np.ascontiguousarray(inputs[t.name], dtype=t.np_dtype)
            i = self.tc.InferInput(t.name, list(arr.shape), TRITON_DTYPES[t.dtype].removeprefix("TYPE_"))
            i.set_data_from_numpy(arr)
            ins.append(i)
        outs = [self.tc.InferRequestedOutput(t.name) for t in spec.outputs]
        request_limited = timeout_s is not None and timeout_s < self.timeout_s
        try:
            res = await asyncio.wait_for(
                self.client.infer(model, ins, model_version=self.model_version, outputs=outs),
                timeout_s if request_limited else self.timeout_s,
            )
        except TimeoutError:
            if request_limited:
                # The request's budget ran out before Triton's own timeout: that says nothing about Triton,
                # and marking it down would send every other request to the fallback for retry_s.
                raise
            self._down(TimeoutError(f"no answer within {self.timeout_s * 1000:g} ms"))
            raise BackendUnavailable(self.last_error) from None
        except Exception as e:  # noqa: BLE001 - refused connections, server errors alike
            self._down(e)
            raise BackendUnavailable(self.last_error) from e
        return {t.name: res.as_numpy(t.name) for t in spec.outputs}

    async def ready(self) -> bool:
        if time.monotonic() < self.down_until:
            return False
        try:
            return bool(await asyncio.wait_for(self.client.is_server_ready(), 0.5))
        except Exception as e:  # noqa: BLE001
            self._down(e)
            return False

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "url": self.url,
            "protocol": self.protocol,
            "model_version": self.model_version or None,
            "down": time.monotonic() < self.down_until,
            "error": self.last_error,
        }

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
