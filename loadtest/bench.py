"""`falconrec bench`: side-by-side latency numbers from one run on this machine.

1. per-stage breakdown of one /v1/recommend request (in-process pipeline, no HTTP);
2. ranking m candidates after a history of n: M-FALCON (history once + microbatches) vs the naive
   single pass with a causal mask vs one pass per candidate, for m in {100, 500, 1000}, n in {50, 200};
3. ONNX Runtime vs torch eager for the M-FALCON ranker;
4. the served graphs' FLOPs and their rate as a fraction of a single-thread GEMM peak measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from service.artifacts import ArtifactPaths
from service.contract import RANKER_CANDIDATES, RANKER_HISTORY, RANKER_ITEM, Manifest, onnx_path
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


def stage_breakdown(
    config: str, artifacts: Path, repo: Path, requests: int = 50, cached: bool = False
) -> dict[str, float]:
    """Median ms per stage of one request for users with a full history. cached=False: the per-history caches
    off (everything computed); True: each user asked twice, the second (timed) request served from them."""
    from service.components import build_components
    from service.pipeline.deadline import Deadline
    from service.settings import Settings

    async def go():
        c = await build_components(
            Settings(
                config=config,
                artifacts_dir=artifacts,
                model_repository=repo,
                grpc_port=0,
                kv_cache_users=10_000 if cached else 0,
                user_vec_cache_users=10_000 if cached else 0,
            )
        )
        users = [u for u, (h, _) in c.recommender.catalog.user_histories.items() if len(h) >= 200][:requests] or list(
            c.recommender.catalog.user_histories
        )[:requests]
        for u in users[:5]:
            await c.recommender.recommend(u, None, 10, True, None, Deadline.ms(10_000))
        sums: dict[str, list[float]] = {}
        totals, cpu = [], []
        for u in users:
            if cached:
                await c.recommender.recommend(u, None, 10, True, None, Deadline.ms(10_000))
            t, tc = time.perf_counter(), time.process_time()
            res = await c.recommender.recommend(u, None, 10, True, None, Deadline.ms(10_000))
            totals.append((time.perf_counter() - t) * 1000)
            cpu.append((time.process_time() - tc) * 1000)  # every thread of the process: the cores it cost
            for k, v in res.timings.stages.items():
                sums.setdefault(k, []).append(v)
        out = {k: statistics.median(v) for k, v in sums.items()}
        out["total (median)"] = statistics.median(totals)
        out["total (p99)"] = float(np.percentile(totals, 99))
        out["CPU per request (median)"] = statistics.median(cpu)
        out["candidates ranked"] = float(res.candidates_ranked)
        await c.recommender.close()
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
    its = ort.InferenceSession(str(onnx_path(repo, RANKER_ITEM)), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    N = manifest.dims.num_items
    rows = []
    for n in ns:
        for m in ms:
            rows.append(_ranking_row(ranker, hs, cs, its, rng, N, E, n, m, microbatch, repeat))
    return rows


def _ranking_row(ranker, hs, cs, its, rng, N: int, E: int, n: int, m: int, microbatch: int, repeat: int) -> dict:
    item = rng.integers(1, N + 1, size=(1, n)).astype(np.int64)
    emb = rng.standard_normal((1, n, E)).astype(np.float32)
    ts = np.sort(rng.integers(10**9, 10**9 + 10**7, size=(1, n))).astype(np.int64)
    valid = np.ones((1, n), np.float32)
    cand = rng.integers(1, N + 1, size=(1, m)).astype(np.int64)
    cemb = rng.standard_normal((1, m, E)).astype(np.float32)
    # History items' and candidates' tokens are per-item work, done at build time (ranker_item): outside every
    # timed path but the naive ones.
    ctok = its.run(None, {"content_emb": cemb[0], "item_idx": cand.T})[0][None]
    htok = its.run(None, {"content_emb": emb[0], "item_idx": item.T})[0][None]
    qts = ts[:, -1:] + 60

    def ort_falcon():
        k, v, q = hs.run(None, {"hist_token": htok, "hist_ts": ts, "hist_valid": valid, "query_ts": qts})
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
                    "cand_token": ctok[:, a : a + microbatch],
                },
            )

    te, ti, tt, tv = map(torch.from_numpy, (emb, item, ts, valid))
    tc, tce, tq, ttok, thtok = map(torch.from_numpy, (cand, cemb, qts, ctok, htok))

    def torch_falcon():
        hidden, k, v = ranker.history(None, None, tt, tv, tq, hist_token=thtok)
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
                None,
                None,
                pos,
                tq.expand_as(c),
                cand_token=ttok[:, a : a + microbatch],
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


def gemm_peak_gflops(size: int = 512, repeat: int = 20) -> float:
    """Single-thread float32 GEMM rate this machine reaches now (torch's BLAS on one thread), GFLOP/s: the
    yardstick for the served graphs, which ONNX Runtime runs one intra-op thread per call here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        ms = _median_ms(lambda: a @ b, repeat, warmup=3)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / (ms / 1000) / 1e9


# What ONNX Runtime's kernels are picked by. The GEMM peak alone hid it: an AVX-512 + VNNI machine (102-118 GFLOP/s)
# and an AVX2-only one (67-94) differed 2.5x in CPU per request on the same code (docs/performance.md, 2026-12-07).
_EXTRAS = {"avx512f": (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_tile", "AMX")),
           "avx2": (("fma", "FMA"), ("avx_vnni", "AVX-VNNI"))}  # fmt: skip


def cpu_summary(cpuinfo: str | None = None, l2: str | None = None) -> str:
    """'AMD EPYC, 2 cores, AVX-512 (VNNI, BF16), L2 1024K a core': this machine's CPU model, cores, widest vector
    instruction set with the extensions the kernels use, and per-core L2, from /proc/cpuinfo and sysfs."""
    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if l2 is None:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index2/size")
        l2 = size.read_text().strip() if size.is_file() else "-"
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    found = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(found.group(1).split()) if found else set()
    isa = "no AVX2"
    for base, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if base in flags:
            extras = [label for flag, label in _EXTRAS[base] if flag in flags]
            isa = f"{name} ({', '.join(extras)})" if extras else name
            break
    name = model.group(1).strip() if model else "-"
    return f"{name}, {os.cpu_count()} cores, {isa}, L2 {l2} a core"


def _graph_flops(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return int(fc.get_total_flops())


@torch.inference_mode()
def efficiency_table(
    config: str, artifacts: Path, repo: Path, call: int, n: int = 200, m: int = 1000, repeat: int = 20
) -> dict:
    """FLOPs (torch's counter on the served graphs), ONNX Runtime time on one thread, and the fraction of the
    GEMM peak measured in the same run, for the user tower and the ranker (history pass + m candidates in calls of
    `call`, as the server makes them: a request's microbatches ride one call, up to rank_batch_max_rows)."""
    from exporters.onnx_export import served_graphs
    from service.contract import USER_TOWER, USER_TOWER_EXTEND
    from training.models import TwoTower

    paths = ArtifactPaths.for_config(config, artifacts)
    manifest = Manifest.read(repo)
    graphs = served_graphs(T.load_checkpoint(paths.towers, TwoTower), T.load_checkpoint(paths.ranker, HSTURanker))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = {
        name: ort.InferenceSession(str(onnx_path(repo, name)), so, providers=["CPUExecutionProvider"])
        for name in (USER_TOWER, USER_TOWER_EXTEND, RANKER_HISTORY, RANKER_CANDIDATES)
    }
    rng = np.random.default_rng(0)
    d, T_ = manifest.dims.d_model, manifest.dims.tower_dim
    hist = {
        "hist_token": rng.standard_normal((1, n, d)).astype(np.float32),
        "hist_ts": np.sort(rng.integers(10**9, 10**9 + 10**7, size=(1, n))).astype(np.int64),
        "hist_valid": np.ones((1, n), np.float32),
        "query_ts": np.full((1, 1), 10**9 + 2 * 10**7, np.int64),
    }
    ut_in = {"hist_token": rng.standard_normal((1, n, T_)).astype(np.float32), "hist_valid": hist["hist_valid"]}
    # The same history reached by one appended event: the incremental user tower computes one position.
    _, past_k, past_v = sess[USER_TOWER].run(None, {key: val[:, :-1] for key, val in ut_in.items()})
    ext_in = {"past_k": past_k, "past_v": past_v, "new_token": ut_in["hist_token"][:, -1:]}
    k, v, q = sess[RANKER_HISTORY].run(None, hist)
    cands = [
        {
            "hist_k": k,
            "hist_v": v,
            "hist_q": q,
            "hist_ts": hist["hist_ts"],
            "hist_valid": hist["hist_valid"],
            "query_ts": hist["query_ts"],
            "cand_token": rng.standard_normal((1, min(call, m - a), manifest.dims.d_model)).astype(np.float32),
        }
        for a in range(0, m, call)
    ]
    peak = gemm_peak_gflops()
    rows = {}
    for label, model, calls in (
        (f"user tower (n={n})", USER_TOWER, [ut_in]),
        (f"user tower extended by 1 (n={n})", USER_TOWER_EXTEND, [ext_in]),
        (f"ranker history (n={n})", RANKER_HISTORY, [hist]),
        (f"ranker candidates (m={m}, calls of {call})", RANKER_CANDIDATES, cands),
    ):
        flops = sum(_graph_flops(graphs[model], c) for c in calls)
        ms = _median_ms(lambda calls=calls, model=model: [sess[model].run(None, c) for c in calls], repeat)
        rate = flops / (ms / 1000) / 1e9
        rows[label] = {"MFLOP": flops / 1e6, "ms": ms, "GFLOP/s": rate, "of peak": rate / peak}
    return {"gemm_peak_gflops": peak, "rows": rows}
