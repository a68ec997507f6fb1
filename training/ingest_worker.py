"""`falconrec ingest`: the ingestion worker. Item text -> the build's text model and pooling (training.embed, the
very code `falconrec build` ran) -> float16 content embedding -> the live version in Redis + the item log.

It uses torch (through training.embed, imported lazily), so it lives with training/ and runs in its own
process: `falconrec ingest`, which the API spawns (service/ingest/supervisor.py) or an operator runs;
the API never imports it. Two inputs:

- Redis (FALCONREC_REDIS_URL, never on the command line: it may hold a password): jobs from the
  `falconrec:ingest` stream, consumer group `workers` (several workers share it; jobs of one that died are claimed
  after `--claim-after-s`); results (title + content embedding) to `items:{v}:log`, which every API replica tails.
- `--stdio` (the API's in-process default, no Redis): JSON lines in on stdin, JSON lines out on stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path

import numpy as np

from service.contract import Manifest
from service.ingest.feed import GROUP, JOBS_STREAM, consumer_name, encode_result, log_key
from service.ingest.live import IngestedItem
from service.redact import for_log
from service.stores.base import item_job_key

log = logging.getLogger("falconrec.ingest.worker")


class Embedder:
    """The build's text model for this repository: the config's model, checked against the manifest's key."""

    def __init__(self, manifest: Manifest, text_model: str | None = None):
        from training.embed import TextEncoder, model_key, resolve_text_model

        name = text_model
        if name is None:
            from training.config import load_config

            name = load_config(manifest.config).embed.model
        if model_key(name) != manifest.embedding_model:
            raise SystemExit(
                f"text model {model_key(name)!r} is not the one this build embedded with "
                f"({manifest.embedding_model!r}): new items must go through the same model"
            )
        t = time.perf_counter()
        self.encoder = TextEncoder(resolve_text_model(name))
        if self.encoder.dim != manifest.dims.content_dim:
            raise SystemExit(f"text model width {self.encoder.dim} != the models' {manifest.dims.content_dim}")
        log.info("text model %s loaded in %.1f s", manifest.embedding_model, time.perf_counter() - t)
        self.items = 0
        self.seconds = 0.0

    def __call__(self, texts: list[str]) -> np.ndarray:
        t = time.perf_counter()
        # float32 mean-pool -> float16, as training.embed.embed_texts stores the build's embeddings
        out = self.encoder.encode(texts).astype(np.float16)
        self.seconds += time.perf_counter() - t
        self.items += len(texts)
        return out

    def rate(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


def _die_with_parent(parent_pid: int | None) -> None:
    if parent_pid is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGTERM when the parent dies, even by SIGKILL
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        raise SystemExit(0)


class Stop:
    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self.requested = True


# --- stdio ------------------------------------------------------------------------------------------------
def announce_ready() -> None:
    """Tell the API (reading our stdout) that the text model is loaded: until then its jobs are waiting."""
    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()


def run_stdio(embed: Embedder, batch: int, parent_pid: int | None) -> None:
    announce_ready()
    fd = sys.stdin.fileno()
    buf = b""
    eof = False
    while not eof or buf:
        # Block for the first line, then take whatever else has arrived, up to `batch` lines per model call.
        ready, _, _ = select.select([fd], [], [], 0 if b"\n" in buf else 1.0)
        if ready:
            chunk = os.read(fd, 1 << 16)
            eof = not chunk
            buf += chunk
        elif b"\n" not in buf:
            if parent_pid is not None and os.getppid() != parent_pid:
                return
            continue
        lines = buf.split(b"\n")
        buf = lines.pop() if not eof else b""
        jobs = [json.loads(x) for x in lines if x.strip()]
        for a in range(0, len(jobs), batch):
            chunk_jobs = jobs[a : a + batch]
            vecs = embed([j["text"] for j in chunk_jobs])
            out = [json.dumps(encode_result(_ingested(j, v))) for j, v in zip(chunk_jobs, vecs, strict=True)]
            sys.stdout.write("\n".join(out) + "\n")
            sys.stdout.flush()


def _ingested(job: dict[str, str], emb: np.ndarray) -> IngestedItem:
    """A job's result (the job's digest travels with it: replicas answer a repeated POST from it)."""
    key = job.get("key") or None  # a string-id catalog's own id, passed through to every replica
    return IngestedItem(int(job["item_id"]), job["title"], emb, float(job["submitted_at"]), job.get("digest"), key)


# --- redis -------------------------------------------------------------------------------------------------
def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def run_redis(
    url: str, embed: Embedder, batch: int, parent_pid: int | None, claim_after_s: float, stop: Stop, reclaim: str | None
) -> None:
    import redis

    r = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=10.0)
    consumer = consumer_name(os.getpid())
    ensured = False
    announce_ready()
    while not stop.requested:
        if parent_pid is not None and os.getppid() != parent_pid:
            return
        try:
            if not ensured:
                try:
                    r.xgroup_create(JOBS_STREAM, GROUP, id="0", mkstream=True)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
                ensured = True
            if reclaim:  # the worker we replace died holding these: take them now, not after claim_after_s
                _reclaim(r, embed, batch, consumer, reclaim)
                reclaim = None
            # Jobs a dead worker took and never acknowledged first, then new ones.
            _, entries, *_ = r.xautoclaim(JOBS_STREAM, GROUP, consumer, int(claim_after_s * 1000), "0-0", count=batch)
            if not entries:
                got = r.xreadgroup(GROUP, consumer, {JOBS_STREAM: ">"}, count=batch, block=1000)
                entries = got[0][1] if got else []
            if entries:
                _process(r, embed, entries)
        except redis.RedisError as e:
            log.warning("redis: %s; retrying", for_log(e))
            ensured = False
            time.sleep(1.0)


def _reclaim(r, embed: Embedder, batch: int, consumer: str, dead: str) -> None:
    """Claim and process the jobs `dead` (a consumer whose process is gone) had taken, then forget it."""
    while pending := r.xpending_range(JOBS_STREAM, GROUP, "-", "+", batch, consumername=dead):
        claimed = r.xclaim(JOBS_STREAM, GROUP, consumer, 0, [p["message_id"] for p in pending])
        log.info("claimed %d jobs of the worker %s", len(claimed), dead)
        _process(r, embed, claimed)
        if len(claimed) < len(pending):  # entries deleted meanwhile: clear them from its pending list
            r.xack(JOBS_STREAM, GROUP, *[p["message_id"] for p in pending])
    r.xgroup_delconsumer(JOBS_STREAM, GROUP, dead)


def _process(r, embed: Embedder, entries: list) -> None:
    jobs = [(eid, {_text(k): _text(v) for k, v in f.items()}) for eid, f in entries if f]
    if not jobs:
        return
    t = time.perf_counter()
    try:
        vecs = embed([f["text"] for _, f in jobs])
    except Exception as e:  # noqa: BLE001 - a job that breaks the model must not crash every worker that claims it
        log.error("dropped %d jobs the text model failed on: %s", len(jobs), for_log(e))
        r.xack(JOBS_STREAM, GROUP, *[eid for eid, _ in jobs])
        r.xdel(JOBS_STREAM, *[eid for eid, _ in jobs])
        # Free their ids: a marker without a job or a logged item would answer every retry "queued" for ever.
        r.delete(*[item_job_key(f["version"], int(f["item_id"])) for _, f in jobs])
        return
    pipe = r.pipeline(transaction=True)
    for (eid, f), v in zip(jobs, vecs, strict=True):
        item = _ingested(f, v)
        pipe.xadd(log_key(f["version"]), encode_result(item))
        pipe.xack(JOBS_STREAM, GROUP, eid)
        pipe.xdel(JOBS_STREAM, eid)
    pipe.execute()
    log.info(
        "ingested %d items in %.0f ms (%.1f items/s overall)", len(jobs), (time.perf_counter() - t) * 1e3, embed.rate()
    )


def run(
    repo: Path,
    batch: int = 32,
    stdio: bool = False,
    text_model: str | None = None,
    parent_pid: int | None = None,
    claim_after_s: float = 30.0,
    reclaim_from: str | None = None,
) -> None:
    """The worker's process (`falconrec ingest`): stdio (JSON lines, the API's own child) or the Redis stream."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=fmt)
    logging.getLogger("falconrec").setLevel(os.environ.get("FALCONREC_LOG_LEVEL", "INFO"))
    _die_with_parent(parent_pid)
    manifest = Manifest.read(repo)
    embed = Embedder(manifest, text_model)
    if stdio:
        run_stdio(embed, batch, parent_pid)
        return
    url = os.environ.get("FALCONREC_REDIS_URL")
    if not url:
        raise SystemExit("set FALCONREC_REDIS_URL (or pass --stdio)")
    log.info("ingestion worker %d waiting for jobs on %s", os.getpid(), JOBS_STREAM)
    # SIGTERM finishes the batch in hand (its jobs are acknowledged with its results); stdio mode just exits.
    run_redis(url, embed, batch, parent_pid, claim_after_s, Stop(), reclaim_from)
