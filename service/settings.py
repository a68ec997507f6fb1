"""Typed settings: FALCONREC_* environment variables, overridable by `falconrec serve` flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


def usable_cores() -> int:
    """Cores this process may run on (its affinity, e.g. a container's cpuset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FALCONREC_", extra="ignore")

    config: str = "ml1m"
    artifacts_dir: Path = Path("artifacts")
    model_repository: Path = Path("model_repository")
    # Model versions (service/versions.py): when set, the service serves the version CURRENT there names (instead of
    # artifacts_dir and model_repository) and swaps to another when CURRENT changes, without a restart.
    versions_dir: Path | None = None
    version_poll_s: float = Field(1.0, gt=0, description="how often every process checks CURRENT for a new version")

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051  # 0 = no gRPC server
    # Server processes sharing the HTTP (and gRPC) port, each with its own models and caches
    # (service/server.py, run_workers).
    # Without Redis each keeps its own in-process store, so the write endpoints answer 503 when workers > 1.
    workers: int = Field(1, ge=1, le=64, description="server processes on the port (writes need Redis when > 1)")

    # Stores: no URL -> in-process store loaded from the artifacts (the embedded default).
    redis_url: str | None = None
    redis_timeout_ms: float = Field(25.0, gt=0)  # 5 ms marked Redis down under load (when requests sent an MGET)
    redis_retry_s: float = Field(1.0, gt=0, description="how often to retry a dead Redis")
    history_cache_users: int = Field(
        50_000, ge=0, description="user histories kept locally to serve while Redis is down (no TTL: see stores)"
    )

    backend: Literal["onnx", "triton"] = "onnx"
    triton_url: str = "127.0.0.1:8001"  # host:port (gRPC) or host:port (HTTP)
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_timeout_ms: float = Field(50.0, gt=0, description="per call, also capped by the request budget")
    triton_retry_s: float = Field(2.0, gt=0, description="after a failure, skip Triton this long")
    triton_fallback: bool = Field(True, description="fall back to in-process ONNX Runtime when Triton fails")
    # With a versions directory: each version was published into Triton's repository as Triton version <n> of v<n>
    # (`falconrec models add --triton-repo`), and every request names the served one; swaps need it.
    triton_versioned: bool = Field(False, description="requests name the served version's Triton number")
    onnx_providers: list[str] | None = None  # default: TensorRT -> CUDA -> CPU, whichever exist
    # TF32 for the CUDA provider's float32 matrix products: faster on Ampere and later, but its rounding exceeds the
    # 1e-3 parity bar with the CPU graphs (loadtest/gpu/measure.py measures both).
    cuda_tf32: bool = False
    intra_op_threads: int = Field(1, ge=0)
    # Threads running model calls. 0 runs them inline on the event loop: no thread hand-off per call, at the cost of
    # the loop doing nothing else meanwhile; meant for `--workers N` with one process per core (issue 11).
    inference_workers: int | None = Field(None, ge=0, le=64, description="model-call threads (0: inline)")
    # uvicorn's loop: "auto" is uvloop where installed (libuv: cheaper socket callbacks and thread hand-offs).
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field("auto", description="the event loop HTTP and gRPC share")

    @property
    def inference_threads(self) -> int:
        """The model-call threads this process runs: the setting, else one per core (0: inline)."""
        return self.inference_workers if self.inference_workers is not None else (os.cpu_count() or 2)

    faiss_threads: int = Field(1, ge=1, description="OpenMP threads for FAISS search (process-wide)")

    # Budget: a request never waits past it.
    budget_ms: float = Field(20.0, gt=0)
    max_budget_ms: float = Field(1000.0, gt=0)
    min_budget_ms: float = Field(
        0.1, gt=0, description="smaller request budgets are refused (422): too small to answer even degraded"
    )
    num_candidates: int | None = Field(None, ge=1, description="default: the build config's")
    max_candidates: int = Field(2000, ge=1)
    microbatch: int | None = Field(None, ge=1)

    # API limits.
    max_k: int = 200
    max_history: int = 2000  # longer request histories are refused; the models read the last max_len
    max_score_items: int = 1000
    max_body_bytes: int = 1 << 20
    # gRPC messages are parsed on the event loop HTTP shares: an 8.7 MB one stalled HTTP (p99 112 ms).
    max_grpc_message_bytes: int = Field(4 << 20, ge=1024)
    score_batch_concurrency: int = Field(
        1, ge=1, description="users of one ScoreBatch in the pipeline at once (they queue FIFO with HTTP)"
    )
    max_concurrency: int = Field(
        64, ge=1, description="requests in flight (counted once their body has arrived); beyond it: 503 at once"
    )
    # Slow clients (issue 22): 64 sockets that sent a head and no body held every admission slot for ever. A body
    # must now arrive within body_timeout_s (408 and close), a request head within header_timeout_s, and a request
    # counts against max_concurrency only once its body is in (service/api/http_guard.py, http_protocol.py).
    header_timeout_s: float = Field(5.0, gt=0, description="a request head must arrive within this (408, close)")
    body_timeout_s: float = Field(10.0, gt=0, description="a request body must arrive within this (408, close)")
    max_incomplete_per_client: int = Field(
        32, ge=1, description="connections part-way through a request per client address; more push out the oldest"
    )
    # One per core plus one: more requests in the pipeline than cores make every one of them late (they share the
    # cores), fewer leave a core idle while a request is in Python. ml1m on 2 cores, a warm server, 20 s per rate
    # (docs/performance.md): 3 instead of 8 kept the service's p99 at 19-23 ms instead of 21-33 ms from 150 to 300
    # req/s, degraded 16-45 % instead of 21-62 % at 250-300, at the price of 1-5 % shed there instead of 0.1-1.5 %.
    max_active: int = Field(
        default_factory=lambda: usable_cores() + 1,
        ge=1,
        description="requests running the pipeline at once (default: cores + 1); the others wait (FIFO) within their "
        "budget",
    )

    # Per-user cache of the ranker's history K/V.
    kv_cache_users: int = Field(10_000, ge=0)
    kv_cache_ttl_s: float = Field(300.0, gt=0)
    # Per-history cache of the user tower's output (its input is the history alone: unchanged, nothing to redo).
    user_vec_cache_users: int = Field(10_000, ge=0)
    # Per-user keys/values of the user tower, so a history grown by a few events computes only those positions
    # (user_tower_extend). ~2 x layers x L x tower_dim float32 per user: ~200 KB at ml1m's L = 200.
    tower_state_users: int = Field(2_048, ge=0)

    # Cross-request batching of candidate scoring (service/pipeline/batching.py).
    rank_batching: bool = Field(True, description="merge concurrent requests' ranking microbatches into one call")
    rank_batch_max_rows: int = Field(4, ge=1, description="microbatches (of `microbatch` candidates) per call")
    rank_batch_wait_us: float = Field(
        0.0, ge=0, le=5000, description="hold a call this long for more rows (0: only what queued meanwhile)"
    )

    # Live data path (issue 10). Keys are 'scope[,scope]:secret' with scopes read, write, admin (admin: every
    # scope). FALCONREC_API_KEYS is a JSON list; FALCONREC_API_KEYS_FILE holds one entry a line (# comments).
    api_keys: list[SecretStr] = Field(default_factory=list, description="write endpoints need a key")
    api_keys_file: Path | None = None
    require_read_key: bool = Field(False, description="also require a 'read' key on /v1/recommend and /v1/score")
    max_event_batch: int = Field(1000, ge=1, description="events in one POST /v1/events")
    event_future_tolerance_s: float = Field(300.0, ge=0, description="events later than now + this are refused")
    event_dedup_window: int = Field(10_000, ge=0, description="event_ids remembered per user for deduplication")
    max_item_batch: int = Field(64, ge=1, description="items in one POST /v1/items")
    max_item_text_chars: int = Field(4000, ge=1)
    # lazy: spawn `falconrec ingest` on the first POST /v1/items; start: at startup; off: an external worker
    # (needs Redis) takes the jobs.
    ingest_worker: Literal["lazy", "start", "off"] = "lazy"
    ingest_batch: int = Field(32, ge=1, description="texts the worker embeds per model call")
    # The spawned worker's niceness: embedding a burst of new items is background work; on a 2-core box at the same
    # priority it took CPU time from the event loop and the inference threads of the requests being served.
    ingest_nice: int = Field(10, ge=0, le=19, description="CPU niceness of the spawned ingestion worker")
