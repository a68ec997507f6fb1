"""The GPU measurement of issue 28, in one process: parity, per-stage latency, throughput under load.

    python -m loadtest.gpu.measure --config ml1m-1epoch --out DIR [--provider CUDAExecutionProvider]

Everything here runs on the CPU provider too (`--provider CPUExecutionProvider`, the dry run): only the provider
changes on the GPU machine. Each section writes its table to DIR as it finishes (`results.md`, `results.json`),
so a failure later in the run keeps what came before.

1. parity: every served graph, the provider against the CPU provider on inputs recorded from real requests (max
   abs and relative difference, TF32 off and on), and the served top 10 of 1,000 users, both backends;
2. latency of one request: the service's pipeline per stage (caches off) at N = 1,000 and 10,000 (a catalog grown
   to 20,000 items, loadtest/gpu/grow.py), and the ranker's graphs alone, plain numpy calls against IO binding
   (history K/V left on the device between ranker_history and ranker_candidates);
3. load: `serve --workers W` with the provider and cross-request batching, the open-loop generator
   (loadtest/openloop.py) on the same machine's cores over loopback, a sweep of rates at N = 1,000 and 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.artifacts import ArtifactPaths
from service.backends.onnx import choose_providers
from service.components import Components, build_components, close_components
from service.contract import (
    ITEM_TOWER,
    MODEL_NAMES,
    RANKER_CANDIDATES,
    RANKER_HISTORY,
    RANKER_ITEM,
    USER_TOWER,
    USER_TOWER_EXTEND,
    Manifest,
    fp32_graph_path,
)
from service.pipeline.deadline import Deadline
from service.settings import Settings

CPU = "CPUExecutionProvider"


def graph(repo: Path, model: str) -> str:
    """The fp32 graph of `model`, what a GPU serves (service/backends/onnx.graph_file): parity and timings here are
    of it on every provider."""
    return str(fp32_graph_path(repo, model))


QUERY_TS = 1_046_454_590 + 86_400  # one day after ML-1M's last rating: the same query time for both backends


class Report:
    """results.md / results.json in the output folder, rewritten after every section."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.md: list[str] = []
        self.data: dict = {}

    def add(self, key: str, value: object, md: str) -> None:
        self.data[key] = value
        self.md.append(md)
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "results.md").write_text("\n\n".join(self.md) + "\n")
        print(md, flush=True)


def table(header: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 and v != 0 else f"{v:,.3f}".rstrip("0").rstrip(".")
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def device_providers(provider: str, tf32: bool = False) -> list:
    return choose_providers([provider] if provider == CPU else [provider, CPU], tf32=tf32)


def settings_for(a: argparse.Namespace, provider: str, config: str, repo: Path, **kw) -> Settings:
    base = {
        "config": config,
        "artifacts_dir": a.artifacts,
        "model_repository": repo,
        "grpc_port": 0,
        "onnx_providers": [provider] if provider == CPU else [provider, CPU],
        "inference_workers": 2,
        "max_candidates": 20_000,
        "ingest_worker": "off",
    }
    return Settings(**(base | kw))


# --- environment -------------------------------------------------------------------------------------------
def environment(provider: str) -> dict:
    env = {
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    try:
        q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm"
        env["gpu"] = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        env["gpu"] = f"none ({e.__class__.__name__})"
    if provider != CPU and provider not in env["available_providers"]:
        raise SystemExit(f"{provider} is not available in this onnxruntime: {env['available_providers']}")
    return env


def check_provider(c: Components, provider: str) -> None:
    """ONNX Runtime falls back to the CPU when a provider fails to load (a missing CUDA library): never measure that
    as the GPU."""
    got = getattr(c.backend, "providers", [])
    if not got or got[0] != provider:
        raise RuntimeError(f"sessions run on {got}, not {provider}: see the log for the provider's load error")


# --- 1. parity ----------------------------------------------------------------------------------------------
def record_inputs(c: Components, keep: int = 8) -> dict[str, list[dict[str, np.ndarray]]]:
    """Wrap the backend so the next requests leave copies of what each graph was given."""
    recorded: dict[str, list[dict[str, np.ndarray]]] = {}
    inner = c.backend.infer

    async def infer(model, inputs, timeout_s=None):
        bucket = recorded.setdefault(model, [])
        if len(bucket) < keep:
            bucket.append({k: np.array(v) for k, v in inputs.items()})
        return await inner(model, inputs, timeout_s)

    c.backend.infer = infer  # type: ignore[method-assign]
    return recorded


def extra_inputs(repo: Path, artifacts: Path, c: Components, recorded: dict) -> None:
    """Inputs for the graphs a cached-off request does not call: the per-item ones and the tower's extension."""
    rng = np.random.default_rng(0)
    n = c.manifest.dims.num_items
    idx = rng.integers(1, n + 1, size=256)
    content = np.load(ArtifactPaths.for_config(c.manifest.config, artifacts).content_emb)[idx - 1]  # row i-1: item i
    per_item = {"content_emb": content.astype(np.float32), "item_idx": idx.reshape(-1, 1).astype(np.int64)}
    recorded[ITEM_TOWER] = recorded[RANKER_ITEM] = [per_item]
    cpu = ort.InferenceSession(graph(repo, USER_TOWER), providers=[CPU])
    ext = []
    for ut in recorded.get(USER_TOWER, [])[:4]:
        _, pk, pv = cpu.run(None, {k: v[:, :-1] for k, v in ut.items()})
        ext.append({"past_k": pk, "past_v": pv, "new_token": ut["hist_token"][:, -1:]})
    recorded[USER_TOWER_EXTEND] = ext


def graph_parity(repo: Path, provider: str, recorded: dict) -> list[list[object]]:
    rows = []
    for model in MODEL_NAMES:
        calls = recorded.get(model, [])
        if not calls:
            rows.append([model, 0, "-", "-", "-", "-"])
            continue
        ref = ort.InferenceSession(graph(repo, model), providers=[CPU])
        row: list[object] = [model, len(calls)]
        for tf32 in (False, True):
            prov = device_providers(provider, tf32)
            sess = ort.InferenceSession(graph(repo, model), providers=prov)
            abs_d, rel_d = 0.0, 0.0
            for inp in calls:
                for a, b in zip(ref.run(None, inp), sess.run(None, inp), strict=True):
                    d = float(np.max(np.abs(a - b))) if a.size else 0.0
                    abs_d = max(abs_d, d)
                    rel_d = max(rel_d, d / max(float(np.max(np.abs(a))), 1e-12))
            row += [abs_d, rel_d]
        rows.append(row)
    return rows


def graph_timing(repo: Path, provider: str, recorded: dict, repeat: int) -> list[list[object]]:
    """Each served graph alone on one recorded input: the CPU provider (one thread) beside the device, median ms."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    rows = []
    for model in MODEL_NAMES:
        if not recorded.get(model):
            continue
        inp = recorded[model][0]
        row: list[object] = [model, " x ".join(str(d) for d in next(iter(inp.values())).shape)]
        for prov in ([CPU], device_providers(provider)):
            sess = ort.InferenceSession(graph(repo, model), so, providers=prov)
            row.append(_median_ms(lambda sess=sess, inp=inp: sess.run(None, inp), repeat))
        rows.append(row)
    return rows


def profile_ops(repo: Path, provider: str, model: str, inputs: dict[str, np.ndarray], work: Path, runs: int = 20):
    """ONNX Runtime's own profile of one graph: time per node kind and provider, per run (us), the top ones."""
    so = ort.SessionOptions()
    so.enable_profiling = True
    work.mkdir(parents=True, exist_ok=True)
    so.profile_file_prefix = str(work / f"profile-{model}")
    sess = ort.InferenceSession(graph(repo, model), so, providers=device_providers(provider))
    for _ in range(runs + 3):
        sess.run(None, inputs)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[tuple[str, str], float] = {}
    run_us = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            key = (e["args"].get("op_name", "?"), e["args"].get("provider", "?"))
            per[key] = per.get(key, 0.0) + e["dur"] / (runs + 3)
    top = sorted(per.items(), key=lambda kv: -kv[1])[:12]
    return {
        "model_run_us_median": statistics.median(run_us[3:]) if len(run_us) > 3 else None,
        "nodes_us_per_run": sum(per.values()),
        "top": [[op, prov, us] for (op, prov), us in top],
    }


async def top10(c: Components, users: list[int]) -> dict[int, list[int]]:
    out = {}
    for u in users:
        res = await c.recommender.recommend(u, None, 10, True, None, Deadline.ms(60_000), QUERY_TS)
        out[u] = [it["item_id"] for it in res.items]
    return out


async def section_parity(a: argparse.Namespace, rep: Report, users: list[int]) -> None:
    cpu_c = await build_components(settings_for(a, CPU, a.config, a.repo))
    recorded = record_inputs(cpu_c)
    ref = await top10(cpu_c, users)
    extra_inputs(a.repo, a.artifacts, cpu_c, recorded)
    await close_components(cpu_c)
    rows = graph_parity(a.repo, a.provider, recorded)
    timing = graph_timing(a.repo, a.provider, recorded, a.repeat)
    rep.add(
        "graph_timing",
        timing,
        f"## Each graph alone, one recorded input (ms, median of {a.repeat}; CPU provider on one thread)\n\n"
        + table(["graph", "first input's shape", "CPU", a.provider], timing),
    )
    for model in (USER_TOWER, RANKER_CANDIDATES):
        prof = profile_ops(a.repo, a.provider, model, recorded[model][0], a.work)
        rep.add(
            f"profile_{model}",
            prof,
            f"## {model} on {a.provider}, ONNX Runtime's profile: a run {prof['model_run_us_median']} us, its "
            f"nodes {prof['nodes_us_per_run']:.0f} us\n\n" + table(["op", "provider", "us per run"], prof["top"]),
        )
    rep.add(
        "graph_parity",
        rows,
        f"## Parity: {a.provider} vs CPU provider, per graph (inputs recorded from served requests)\n\n"
        + table(["graph", "calls", "max abs (TF32 off)", "max rel (off)", "max abs (TF32 on)", "max rel (on)"], rows),
    )
    dev_c = await build_components(settings_for(a, a.provider, a.config, a.repo))
    check_provider(dev_c, a.provider)
    got = await top10(dev_c, users)
    await close_components(dev_c)
    same_order = sum(ref[u] == got[u] for u in users)
    same_set = sum(set(ref[u]) == set(got[u]) for u in users)
    overlap = statistics.mean(len(set(ref[u]) & set(got[u])) / 10 for u in users)
    value = {"users": len(users), "identical_order": same_order, "identical_set": same_set, "mean_overlap": overlap}
    rep.add(
        "topk_parity",
        value,
        f"## Parity of the served top 10 ({a.provider}, TF32 off, vs CPU; {len(users)} users, N = 1,000)\n\n"
        + table(
            ["users", "identical (order)", "identical (set)", "mean overlap"],
            [[len(users), f"{same_order / len(users):.1%}", f"{same_set / len(users):.1%}", overlap]],
        ),
    )


# --- 2. latency of one request ------------------------------------------------------------------------------
async def pipeline_latency(c: Components, users: list[int], n: int) -> dict[str, float]:
    """Median (and p99 of the total) of each stage over sequential requests, the per-history caches off."""
    for u in users[:20]:
        await c.recommender.recommend(u, None, 10, True, n, Deadline.ms(5_000), QUERY_TS)
    stages: dict[str, list[float]] = {}
    totals = []
    ranked = 0
    for u in users:
        t = time.perf_counter()
        res = await c.recommender.recommend(u, None, 10, True, n, Deadline.ms(5_000), QUERY_TS)
        totals.append((time.perf_counter() - t) * 1000)
        ranked = res.candidates_ranked
        for k, v in res.timings.stages.items():
            stages.setdefault(k, []).append(v)
    out = {k: statistics.median(v) for k, v in stages.items()}
    out |= {"total p50": statistics.median(totals), "total p99": float(np.percentile(totals, 99)), "ranked": ranked}
    return out


def _median_ms(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def ranker_graphs(repo: Path, provider: str, hist: dict[str, np.ndarray], tokens: np.ndarray, repeat: int) -> list:
    """ranker_history + ranker_candidates alone: numpy in and out against IO binding (K/V stay on the device)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    prov = device_providers(provider)
    hs = ort.InferenceSession(graph(repo, RANKER_HISTORY), so, providers=prov)
    cs = ort.InferenceSession(graph(repo, RANKER_CANDIDATES), so, providers=prov)
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    side = {k: hist[k] for k in ("hist_ts", "hist_valid", "query_ts")}
    rng = np.random.default_rng(1)
    rows = []
    for m, bm in ((1000, 256), (1000, 1000), (10_000, 1000), (10_000, 2500), (10_000, 10_000)):
        cand = tokens[rng.integers(1, len(tokens), size=m)][None]

        def plain(cand=cand, bm=bm, m=m):
            k, v, q = hs.run(None, hist)
            for a in range(0, m, bm):
                cs.run(None, {"hist_k": k, "hist_v": v, "hist_q": q, **side, "cand_token": cand[:, a : a + bm]})

        def bound(cand=cand, bm=bm, m=m):
            b = hs.io_binding()
            for name, val in hist.items():
                b.bind_cpu_input(name, val)
            for name in ("hist_k", "hist_v", "hist_q"):
                b.bind_output(name, device)
            hs.run_with_iobinding(b)
            kvq = dict(zip(("hist_k", "hist_v", "hist_q"), b.get_outputs(), strict=True))
            for a in range(0, m, bm):
                cb = cs.io_binding()
                for name, val in kvq.items():
                    cb.bind_ortvalue_input(name, val)
                for name, val in side.items():
                    cb.bind_cpu_input(name, val)
                cb.bind_cpu_input("cand_token", np.ascontiguousarray(cand[:, a : a + bm]))
                cb.bind_output("scores", "cpu")
                cs.run_with_iobinding(cb)

        hist_only = _median_ms(lambda: hs.run(None, hist), repeat)
        rows.append([m, bm, hist_only, _median_ms(plain, repeat), _median_ms(bound, repeat)])
    return rows


async def section_latency(a: argparse.Namespace, rep: Report, users: list[int], grown: tuple[str, Path]) -> None:
    off = {"kv_cache_users": 0, "user_vec_cache_users": 0, "tower_state_users": 0}
    results = {}
    for label, config, repo, n, mb in (
        ("N = 1,000", a.config, a.repo, 1000, 1000),
        ("N = 10,000", grown[0], grown[1], 10_000, 2500),
    ):
        c = await build_components(settings_for(a, a.provider, config, repo, microbatch=mb, **off))
        check_provider(c, a.provider)
        results[label] = await pipeline_latency(c, users[: a.latency_users], n)
        await close_components(c)
    stages = list(dict.fromkeys(k for r in results.values() for k in r))
    rows = [[k, *(results[label].get(k, "-") for label in results)] for k in stages]
    rep.add(
        "pipeline_latency",
        results,
        f"## One request through the service's pipeline ({a.provider}; caches off; ms, medians of "
        f"{a.latency_users} sequential requests; FAISS on CPU)\n\n" + table(["stage", *results], rows),
    )
    c = await build_components(settings_for(a, a.provider, a.config, a.repo, **off))
    recorded = record_inputs(c, keep=1)
    await c.recommender.recommend(users[0], None, 10, True, 1000, Deadline.ms(5_000), QUERY_TS)
    hist = recorded[RANKER_HISTORY][0]
    tokens = c.recommender.tokens.ranker.gather(np.arange(c.recommender.tokens.rows))
    await close_components(c)
    graph_rows = ranker_graphs(a.repo, a.provider, hist, tokens, a.repeat)
    rep.add(
        "ranker_graphs",
        graph_rows,
        f"## The ranker's graphs alone ({a.provider}; ms, median of {a.repeat}; history n = "
        f"{hist['hist_token'].shape[1]})\n\n"
        + table(["m", "microbatch", "ranker_history", "history + candidates (numpy)", "same, IO binding"], graph_rows),
    )


# --- 3. load ------------------------------------------------------------------------------------------------
def start_server(
    a: argparse.Namespace, config: str, repo: Path, port: int, microbatch: int, log: Path, workers: int, threads: int
):
    env = {
        **os.environ,
        "FALCONREC_CONFIG": config,
        "FALCONREC_ARTIFACTS_DIR": str(a.artifacts),
        "FALCONREC_MODEL_REPOSITORY": str(repo),
        "FALCONREC_PORT": str(port),
        "FALCONREC_GRPC_PORT": "0",
        "FALCONREC_WORKERS": str(workers),
        "FALCONREC_INFERENCE_WORKERS": str(threads),
        "FALCONREC_ONNX_PROVIDERS": json.dumps([a.provider] if a.provider == CPU else [a.provider, CPU]),
        "FALCONREC_MAX_CANDIDATES": "20000",
        "FALCONREC_MICROBATCH": str(microbatch),
        "FALCONREC_RANK_BATCH_MAX_ROWS": str(a.batch_rows),
        "FALCONREC_MAX_CONCURRENCY": "512",
    }
    code = "from service.server import run; from service.settings import Settings; run(Settings())"
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_ready(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    import urllib.request

    end = time.time() + timeout_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready in time:\n{log.read_text()[-3000:]}")


def openloop(a: argparse.Namespace, port: int, rate: float, seconds: float, users: Path, n: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "loadtest.openloop",
        "--url",
        f"http://127.0.0.1:{port}",
        "--rate",
        str(rate),
        "--duration",
        str(seconds),
        "--users",
        f"@{users}",
        "--num-candidates",
        str(n),
        "--procs",
        str(a.gen_procs),
        "--out",
        str(a.work / f"openloop-{n}-{int(rate)}.json"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"generator failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


LOAD_HEADER = ["target req/s", "achieved", "p50 ms", "p99 ms", "server p99 ms", "degraded", "errors", "gen lag ms"]


def load_row(rate: float, s: dict) -> list[object]:
    return [
        rate,
        s["achieved_rate"],
        s["p50_ms"],
        s["p99_ms"],
        s["server_p99_ms"],
        f"{s['degraded_share']:.1%}",
        s["sent"] - s["ok"],
        s["generator_lag_ms"],
    ]


def sweep(a: argparse.Namespace, port: int, rates: list[float], users_file: Path, n: int) -> tuple[list, dict]:
    """Rates in order until far past saturation; the rows and each rate's per-stage p50/p99 (Server-Timing)."""
    openloop(a, port, rates[0], 3, users_file, n)  # every worker warm (the first calls allocate)
    rows, stages = [], {}
    for rate in rates:
        s = openloop(a, port, rate, a.load_seconds, users_file, n)
        rows.append(load_row(rate, s))
        stages[rate] = s.get("stages_p50_p99_ms", {})
        if s["p99_ms"] is None or s["p99_ms"] > 100 or s["sent"] - s["ok"] > 0.01 * s["sent"]:
            break  # past saturation: more would only queue
    return rows, stages


def section_load(a: argparse.Namespace, rep: Report, users: list[int], grown: tuple[str, Path]) -> None:
    a.work.mkdir(parents=True, exist_ok=True)
    users_file = a.work / "users.txt"
    users_file.write_text("\n".join(map(str, users)))
    plans = [(1000, a.config, a.repo, 1000, a.rates_1k, v) for v in a.variants]
    plans.append((10_000, grown[0], grown[1], 2500, a.rates_10k, a.variants_10k))
    for n, config, repo, mb, rates, (workers, threads) in plans:
        port = 18000 + n % 997 + workers
        log = a.work / f"server-{n}-{workers}.log"
        proc = start_server(a, config, repo, port, mb, log, workers, threads)
        try:
            wait_ready(port, proc, log)
            rows, stages = sweep(a, port, rates, users_file, n)
        finally:
            _stop(proc)
        best = max((r[0] for r in rows if r[3] is not None and r[3] <= 5 and r[6] == 0), default=None)
        stage_rows = [[rate, *(f"{k} {v[0]}/{v[1]}" for k, v in st.items())] for rate, st in stages.items()]
        rep.add(
            f"load_{n}_{workers}x{threads}",
            {"rows": rows, "best_rate_p99_le_5ms": best, "stages": stages},
            f"## Load at N = {n:,} ({a.provider}; serve --workers {workers}, {threads} inference threads each, "
            f"microbatch {mb}, {a.batch_rows} rows per call; open loop, {a.gen_procs} generator processes, "
            f"{a.load_seconds:g} s per rate; highest rate with p99 <= 5 ms and no errors: {best})\n\n"
            + table(LOAD_HEADER, rows)
            + "\n\nServer-Timing per stage, p50/p99 ms:\n\n"
            + "\n".join(f"- {r[0]:g} req/s: " + ", ".join(r[1:]) for r in stage_rows),
        )


def _stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


# --- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="ml1m-1epoch")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, required=True, help="results.md and results.json (nothing else)")
    p.add_argument("--work", type=Path, default=Path("/tmp/falconrec-gpu"), help="scratch: logs, samples")
    p.add_argument("--provider", default="CUDAExecutionProvider")
    p.add_argument("--sections", default="parity,latency,load")
    p.add_argument("--parity-users", type=int, default=1000)
    p.add_argument("--latency-users", type=int, default=200)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--grow-to", type=int, default=20_000)
    p.add_argument("--variants", default="2x4,4x4,8x2", help="server processes x inference threads, N = 1,000")
    p.add_argument("--variants-10k", default="4x4", help="the same, N = 10,000 (one)")
    p.add_argument("--batch-rows", type=int, default=8)
    p.add_argument("--gen-procs", type=int, default=4)
    p.add_argument("--load-seconds", type=float, default=6.0)
    p.add_argument("--rates-1k", default="250,500,1000,2000,3000")
    p.add_argument("--rates-10k", default="250,500,1000")
    a = p.parse_args(argv)
    a.rates_1k = [float(x) for x in a.rates_1k.split(",")]
    a.rates_10k = [float(x) for x in a.rates_10k.split(",")]
    a.variants = [tuple(int(x) for x in v.split("x")) for v in a.variants.split(",")]
    a.variants_10k = tuple(int(x) for x in a.variants_10k.split("x"))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rep = Report(a.out)
    t0 = time.perf_counter()
    env = environment(a.provider)
    rep.add("environment", env, "## Environment\n\n```\n" + json.dumps(env, indent=2) + "\n```")
    manifest = Manifest.read(a.repo)
    data = np.load(ArtifactPaths.for_config(manifest.config, a.artifacts).data)
    users = [int(u) for u in data["user_raw_ids"][np.argsort(-data["lengths"], kind="stable")][: a.parity_users]]
    from loadtest.gpu.grow import grow

    grown_name = f"{manifest.config}-grown"
    grown_repo = ArtifactPaths.for_config(grown_name, a.artifacts).root / "model_repository"
    sections = a.sections.split(",")
    failed = 0
    for name, fn in (
        ("grow", lambda: grow(a.artifacts, a.repo, a.grow_to, grown_name, grown_repo)),
        ("parity", lambda: asyncio.run(section_parity(a, rep, users))),
        ("latency", lambda: asyncio.run(section_latency(a, rep, users, (grown_name, grown_repo)))),
        ("load", lambda: section_load(a, rep, users, (grown_name, grown_repo))),
    ):
        if name != "grow" and name not in sections:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - the window is scarce: keep going, report the failure
            failed += 1
            rep.add(f"error_{name}", traceback.format_exc(), f"## {name} FAILED\n\n```\n{traceback.format_exc()}```")
        print(f"[{name}: {time.perf_counter() - t:.1f} s]", flush=True)
    rep.add("wall_s", round(time.perf_counter() - t0, 1), f"_whole run: {time.perf_counter() - t0:.0f} s_")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
