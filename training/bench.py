"""`falconrec bench`: side-by-side latency numbers from one run on this machine.

1. per-stage breakdown of one /v1/recommend request (in-process pipeline, no HTTP);
2. ranking m candidates after a history of n: M-FALCON (history once + microbatches) vs the naive
   single pass with a causal mask vs one pass per candidate, for m in {100, 500, 1000}, n in {50, 200};
3. ONNX Runtime vs torch eager for the M-FALCON ranker.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.artifacts import ArtifactPaths
from service.contract import RANKER_CANDIDATES, RANKER_HISTORY, Manifest, onnx_path
from training import train as T
from training.models import HSTURanker, one_pass


def _median_ms(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def stage_breakdown(config: str, artifacts: Path, repo: Path, requests: int = 50) -> dict[str, float]:
    from service.api.app import build_components
    from service.pipeline.deadline import Deadline
    from service.settings import Settings

    async def go():
        c = await build_components(
            Settings(config=config, artifacts_dir=artifacts, model_repository=repo, grpc_port=0, kv_cache_users=0)
        )
        users = [u for u, (h, _) in c.recommender.catalog.user_histories.items() if len(h) >= 200][:requests] or list(
            c.recommender.catalog.user_histories
        )[:requests]
        for u in users[:5]:
            await c.recommender.recommend(u, None, 10, True, None, Deadline.ms(10_000))
        sums: dict[str, list[float]] = {}
        totals = []
        for u in users:
            t = time.perf_counter()
            res = await c.recommender.recommend(u, None, 10, True, None, Deadline.ms(10_000))
            totals.append((time.perf_counter() - t) * 1000)
            for k, v in res.timings.stages.items():
                sums.setdefault(k, []).append(v)
        out = {k: statistics.median(v) for k, v in sums.items()}
        out["total (median)"] = statistics.median(totals)
        out["total (p99)"] = float(np.percentile(totals, 99))
        out["candidates ranked"] = float(res.candidates_ranked)
        await c.store.close()
        await c.backend.close()
        return out

    return asyncio.run(go())


@torch.inference_mode()  # scoped, never process-wide: callers may train afterwards
def ranking_table(
    config: str,
    artifacts: Path,
    repo: Path,
    microbatch: int,
    repeat: int = 3,
    ms: tuple[int, ...] = (100, 500, 1000),
    ns: tuple[int, ...] = (50, 200),
) -> list[dict]:
    paths = ArtifactPaths.for_config(config, artifacts)
    ranker = T.load_checkpoint(paths.ranker, HSTURanker)
    manifest = Manifest.read(repo)
    E = manifest.dims.content_dim
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    hs = ort.InferenceSession(str(onnx_path(repo, RANKER_HISTORY)), so, providers=["CPUExecutionProvider"])
    cs = ort.InferenceSession(str(onnx_path(repo, RANKER_CANDIDATES)), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    N = manifest.dims.num_items
    rows = []
    for n in ns:
        for m in ms:
            rows.append(_ranking_row(ranker, hs, cs, rng, N, E, n, m, microbatch, repeat))
    return rows


def _ranking_row(ranker, hs, cs, rng, N: int, E: int, n: int, m: int, microbatch: int, repeat: int) -> dict:
    item = rng.integers(1, N + 1, size=(1, n)).astype(np.int64)
    emb = rng.standard_normal((1, n, E)).astype(np.float32)
    ts = np.sort(rng.integers(10**9, 10**9 + 10**7, size=(1, n))).astype(np.int64)
    valid = np.ones((1, n), np.float32)
    cand = rng.integers(1, N + 1, size=(1, m)).astype(np.int64)
    cemb = rng.standard_normal((1, m, E)).astype(np.float32)
    qts = ts[:, -1:] + 60

    def ort_falcon():
        k, v, q = hs.run(
            None, {"hist_emb": emb, "hist_item": item, "hist_ts": ts, "hist_valid": valid, "query_ts": qts}
        )
        for a in range(0, m, microbatch):
            cs.run(
                None,
                {
                    "hist_k": k,
                    "hist_v": v,
                    "hist_q": q,
                    "hist_ts": ts,
                    "hist_valid": valid,
                    "query_ts": qts,
                    "cand_emb": cemb[:, a : a + microbatch],
                    "cand_item": cand[:, a : a + microbatch],
                },
            )

    te, ti, tt, tv = map(torch.from_numpy, (emb, item, ts, valid))
    tc, tce, tq = map(torch.from_numpy, (cand, cemb, qts))

    def torch_falcon():
        hidden, k, v = ranker.history(te, ti, tt, tv, tq)
        q = ranker.next_item_query(hidden[:, -1])
        for a in range(0, m, microbatch):
            c = tc[:, a : a + microbatch]
            pos = torch.full(c.shape, n, dtype=torch.int64)
            ranker.candidates(
                k,
                v,
                q.unsqueeze(1).expand(1, c.shape[1], -1),
                tt,
                tv,
                tce[:, a : a + microbatch],
                c,
                pos,
                tq.expand_as(c),
            )

    def torch_naive():
        one_pass(ranker, te, ti, tt, tv, tq, tce, tc, mask="causal")

    def torch_per_candidate():
        for j in range(m):
            one_pass(ranker, te, ti, tt, tv, tq, tce[:, j : j + 1], tc[:, j : j + 1], mask="falcon")

    return {
        "n": n,
        "m": m,
        "M-FALCON ORT (ms)": _median_ms(ort_falcon, repeat),
        "M-FALCON torch (ms)": _median_ms(torch_falcon, repeat),
        "naive causal pass, torch (ms)": _median_ms(torch_naive, repeat),
        "pass per candidate, torch (ms)": _median_ms(torch_per_candidate, 1, warmup=0),
    }
