"""In-process ONNX Runtime backend. Providers in order TensorRT -> CUDA -> CPU, whichever this build has."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.backends.base import InferenceBackend
from service.backends.threads import WorkerThreads
from service.contract import MODEL_NAMES, ModelDims, fp32_graph_path, model_specs, onnx_path

log = logging.getLogger("falconrec.onnx")
PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: list[str] | None = None, trt_cache: Path | None = None, tf32: bool = False) -> list:
    """Providers with their options. CUDA runs float32 matrix products in full float32 unless `tf32`: ORT's
    default (TF32 on) rounds their inputs to 10 mantissa bits, more than the 1e-3 parity bar with the CPU allows."""
    available = ort.get_available_providers()
    names = [p for p in (requested or PREFERRED) if p in available] or ["CPUExecutionProvider"]
    if requested is None and "TensorrtExecutionProvider" in names and not _tensorrt_loadable():
        # onnxruntime-gpu lists TensorRT whether or not its libraries are installed (the H200 machine of issue 28
        # had none): by default, go straight to CUDA instead of failing over at session creation.
        names.remove("TensorrtExecutionProvider")
    out: list = []
    for p in names:
        if p == "TensorrtExecutionProvider":
            opts = {"trt_fp16_enable": True}
            if trt_cache:
                trt_cache.mkdir(parents=True, exist_ok=True)
                opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache)}
            out.append((p, opts))
        elif p == "CUDAExecutionProvider":
            out.append((p, {"use_tf32": "1" if tf32 else "0"}))
        else:
            out.append(p)
    return out


def graph_file(repo: Path, model: str, provider: str) -> Path:
    """The ONNX file a session on `provider` loads: model.onnx, except where it is int8 (an fp32 origin lies
    beside it) and the provider is not the CPU's: ONNX Runtime has no CUDA kernels for the int8 ops and would run
    them on the CPU with copies both ways (onnxruntime#7745)."""
    path = onnx_path(repo, model)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: build the repository first (`falconrec build`)")
    if provider != "CPUExecutionProvider" and fp32_graph_path(repo, model) != path:
        log.info("%s: the fp32 graph on %s", model, provider)
        return fp32_graph_path(repo, model)
    return path


def _tensorrt_loadable() -> bool:
    for lib in ("libnvinfer.so.10", "libnvinfer.so.8"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


class OnnxBackend(InferenceBackend):
    name = "onnxruntime"

    def __init__(
        self,
        repo: Path,
        dims: ModelDims,
        providers: list[str] | None = None,
        intra_op_threads: int = 1,
        workers: int | None = None,
        trt_cache: Path | None = None,
        tf32: bool = False,
    ):
        self.repo = Path(repo)
        self.specs = model_specs(dims)
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = choose_providers(providers, trt_cache, tf32)
        self.sessions: dict[str, ort.InferenceSession] = {}
        wanted = chosen[0][0] if isinstance(chosen[0], tuple) else chosen[0]
        for m in MODEL_NAMES:
            path = graph_file(self.repo, m, wanted)
            self.sessions[m] = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
        self.providers = self.sessions[MODEL_NAMES[0]].get_providers()
        log.info("onnxruntime %s providers %s", ort.__version__, self.providers)
        if self.providers[0] != wanted:
            # ONNX Runtime falls back silently when a provider's libraries fail to load (CUDA's: LD_LIBRARY_PATH).
            log.warning("asked for %s, running on %s: see ONNX Runtime's load error above", wanted, self.providers[0])
        # workers == 0: calls run inline on the caller's thread (one process per core, no hand-off per call).
        n = (os.cpu_count() or 2) if workers is None else workers
        self._pool = WorkerThreads(n, "ort") if n > 0 else None

    def run(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[model]
        outs = self.sessions[model].run([t.name for t in spec.outputs], inputs)
        return {t.name: o for t, o in zip(spec.outputs, outs, strict=True)}

    async def infer(self, model, inputs, timeout_s=None):
        if self._pool is None:
            return self.run(model, inputs)
        # Off the event loop: ORT releases the GIL while it computes.
        fut = self._pool.submit(self.run, model, inputs)
        return await (asyncio.wait_for(fut, timeout_s) if timeout_s else fut)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "onnxruntime": ort.__version__,
            "providers": self.providers,
            "repository": str(self.repo),
        }

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
