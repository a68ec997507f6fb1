"""The commands that measure: the load test, new-item latency, the serving benchmark, recall at catalog scale, the
hardening harness."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from falconrec.offline import require_offline
from falconrec.options import ArtifactsOpt, ConfigOpt, RepoOpt, console, default_config, log_line
from service.artifacts import DEFAULT_ARTIFACTS, DEFAULT_REPOSITORY


def loadtest(
    host: Annotated[str, typer.Option(help="running server")] = "http://127.0.0.1:8000",
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    rate: Annotated[float, typer.Option(help="requests per second, total")] = 50.0,
    duration: Annotated[int, typer.Option(help="seconds")] = 60,
    users: Annotated[int, typer.Option(help="Locust users (concurrency)")] = 20,
    budget_ms: Annotated[float, typer.Option(help="p99 SLO in ms")] = 20.0,
    num_candidates: Annotated[int | None, typer.Option(help="candidates ranked per request")] = None,
    request_budget_ms: Annotated[
        float | None,
        typer.Option(help="budget_ms sent with each request (default: the server's); below the SLO by what HTTP costs"),
    ] = None,
    out: Annotated[Path, typer.Option(help="where CSV, PNG and summary.md go")] = Path("loadtest/results"),
    write_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.9,
            help="mixed profile: a second phase at the same read rate with this share of POST /v1/events "
            "(write key from FALCONREC_LT_API_KEY)",
        ),
    ] = 0.0,
) -> None:
    """Fixed-rate headless Locust run; exits 1 when p99 > budget or errors > 0.1 %."""
    from loadtest.run import run_loadtest
    from service.artifacts import ArtifactPaths

    rc, md = run_loadtest(
        host,
        ArtifactPaths.for_config(config, artifacts).data,
        rate,
        duration,
        users,
        out,
        budget_ms,
        num_candidates=num_candidates,
        request_budget_ms=request_budget_ms,
        write_fraction=write_fraction,
        api_key=os.environ.get("FALCONREC_LT_API_KEY"),
    )
    Console().print(md)
    raise typer.Exit(rc)


def ingest_latency(
    host: Annotated[str, typer.Option(help="replica to POST /v1/items to")] = "http://127.0.0.1:8000",
    replica: Annotated[str | None, typer.Option(help="replica to watch (default: --host)")] = None,
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    items: Annotated[int, typer.Option(help="items POSTed one at a time (p50/p99)")] = 60,
    burst: Annotated[int, typer.Option(help="items POSTed at once (items/s)")] = 60,
    start_id: Annotated[int, typer.Option(help="first new item id (ids must be new)")] = 10_000_000,
) -> None:
    """POST /v1/items -> recommendable on a replica: p50/p99 one at a time, and items/s for a burst.
    The write key comes from FALCONREC_LT_API_KEY."""
    import numpy as np

    from loadtest.ingest import measure_ingest, variants
    from service.artifacts import ArtifactPaths

    key = os.environ.get("FALCONREC_LT_API_KEY")
    if not key:
        console.print("[red]set FALCONREC_LT_API_KEY to a key with the write scope[/red]")
        raise typer.Exit(2)
    texts = np.load(ArtifactPaths.for_config(config, artifacts).data)["item_texts"].tolist()
    tag = f"r{start_id}"
    rep = measure_ingest(
        host, replica or host, key, variants(texts, items, tag), start_id, variants(texts[items:], burst, tag + "b")
    )
    Console().print(rep.markdown())


def bench(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    requests: Annotated[int, typer.Option(help="requests for the per-stage breakdown")] = 50,
    repeat: Annotated[int, typer.Option(help="timed repeats per ranking cell (median)")] = 3,
) -> None:
    """Per-stage latency of one request; M-FALCON vs naive vs per-candidate; ORT vs torch eager."""
    require_offline()
    from loadtest.bench import cpu_summary, efficiency_table, ranking_table, stage_breakdown
    from service.contract import Manifest
    from service.settings import Settings

    manifest = Manifest.read(repo)
    precision = f"int8: {', '.join(manifest.int8)}" if manifest.int8 else "fp32"  # the numbers depend on it
    cold = stage_breakdown(config, artifacts, repo, requests)
    warm = stage_breakdown(config, artifacts, repo, requests, cached=True)
    t = Table(title=f"one /v1/recommend, in-process ({config}, {precision}), median of {requests} users")
    t.add_column("stage")
    t.add_column("ms, caches off", justify="right")
    t.add_column("ms, history unchanged (cached)", justify="right")
    for k in dict.fromkeys([*cold, *warm]):
        fmt = (lambda v: f"{v:.0f}") if "candidates" in k else (lambda v: f"{v:.2f}")
        t.add_row(k, *(fmt(d[k]) if k in d else "-" for d in (cold, warm)))
    Console().print(t)
    mb = manifest.microbatch
    eff = efficiency_table(config, artifacts, repo, mb * Settings().rank_batch_max_rows)
    t = Table(
        title=f"served graphs ({precision}) on 1 thread vs this machine's GEMM peak ({eff['gemm_peak_gflops']:.1f} "
        f"GFLOP/s, torch float32 512^3, 1 thread, same run; {cpu_summary()})"
    )
    for col in ("graph", "MFLOP", "ms", "GFLOP/s", "of peak"):
        t.add_column(col, justify="right")
    for name, r in eff["rows"].items():
        t.add_row(name, f"{r['MFLOP']:.1f}", f"{r['ms']:.2f}", f"{r['GFLOP/s']:.1f}", f"{r['of peak']:.0%}")
    Console().print(t)
    rows = ranking_table(config, artifacts, repo, mb, repeat)
    t = Table(title=f"ranking m candidates after n history items (microbatch {mb}, 1 thread, median ms)")
    for col in rows[0]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(*(f"{v:.1f}" if isinstance(v, float) else str(v) for v in r.values()))
    Console().print(t)


def bench_index(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    items: Annotated[int, typer.Option(help="catalog size to grow the built one to")] = 1_000_000,
    kinds: Annotated[str, typer.Option(help="index kinds, comma-separated; flat (exact) first for recall")] = (
        "flat,hnsw,ivf"
    ),
    queries: Annotated[int, typer.Option(help="real user vectors to search with")] = 200,
    k: Annotated[int, typer.Option(help="candidates recalled (recall@k against exact search)")] = 1000,
) -> None:
    """Recall, memory, build time and search latency of each FAISS index kind at catalog scale (up to 1M)."""
    require_offline()
    from loadtest.bench_index import index_scale_bench

    out = index_scale_bench(config, artifacts, repo, items, tuple(kinds.split(",")), queries, k, log=console.print)
    t = Table(title=f"{out['items']:,} items, {out['queries']} real user vectors, top {out['k']}")
    cols = ["index", "build s", "MB", "search p50 ms", "search p99 ms", f"recall@{out['k']}"]
    for col in cols:
        t.add_column(col, justify="right")
    for kind, r in out["rows"].items():
        rec = r.get(f"recall@{out['k']}")
        t.add_row(
            kind,
            f"{r['build_s']:.1f}",
            f"{r['bytes'] / 1e6:.0f}",
            f"{r['search_p50_ms']:.2f}",
            f"{r['search_p99_ms']:.2f}",
            "-" if rec is None else f"{rec:.4f}",
        )
    Console().print(t)


def bench_data(
    interactions: Annotated[int, typer.Option(help="events in the ML-20M-sized log")] = 20_000_000,
    users: Annotated[int, typer.Option(help="users of that log")] = 140_000,
    items: Annotated[int, typer.Option(help="items of that log")] = 27_000,
    catalog: Annotated[int, typer.Option(help="items of the large-catalog case (0: skip it)")] = 1_000_000,
    catalog_interactions: Annotated[int, typer.Option(help="events of the large-catalog case")] = 5_000_000,
    string_ids: Annotated[bool, typer.Option(help="also load the log with string ids")] = True,
) -> None:
    """Dataset loader at scale: generates Parquet files in a temp dir, loads each in a fresh process; load time,
    peak RSS, data.npz save/load (docs/data.md)."""
    require_offline()
    from loadtest.bench_data import bench_data as run

    rows = run(interactions, users, items, catalog, catalog_interactions, string_ids, log=log_line)
    t = Table(title="dataset loader: Parquet -> Dataset (fresh process each; peak RSS = ru_maxrss)")
    cols = ["case", "ids", "interactions", "users", "items", "Parquet MB", "load s", "RSS after imports MB"]
    for col in [*cols, "peak RSS MB", "save npz s", "npz MB", "npz load s"]:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            r["case"],
            r["ids"],
            f"{r['interactions']:,}",
            f"{r['users']:,}",
            f"{r['items']:,}",
            f"{r['parquet_mb']:.0f}",
            f"{r['load_s']:.1f}",
            f"{r['import_rss_mb']:.0f}",
            f"{r['load_peak_rss_mb']:.0f}",
            f"{r['save_s']:.1f}",
            f"{r['npz_mb']:.0f}",
            f"{r['npz_load_s']:.1f}",
        )
    Console(width=180).print(t)


# `falconrec hardening` hands its arguments to the harness's own parser (loadtest/hardening/options.py), where every
# one of its ~45 options is declared once with its default and help; `--help` is the harness's too.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def hardening(ctx: typer.Context) -> None:
    """Reliability measurements against a real `falconrec serve` on a private redis-server: Redis killed and frozen,
    wide and cancelled gRPC batches, overload, slow bodies, huge item ids, a killed ingestion worker (--parts);
    prints a markdown report. `falconrec hardening --help` lists every option."""
    from loadtest.hardening import main

    raise typer.Exit(main(list(ctx.args), prog="falconrec hardening"))


def swaps(
    rate: Annotated[float, typer.Option(help="requests per second, open loop")] = 100.0,
    phase_s: Annotated[float, typer.Option(help="seconds between swaps (three promotions, one rollback)")] = 15.0,
    versions: Annotated[
        Path | None,
        typer.Option(help="a versions directory with three versions of --config (tiny: built when missing)"),
    ] = None,
    config: Annotated[str, typer.Option("--config", "-c", help="the config the versions serve")] = "tiny",
) -> None:
    """Version swaps under steady load: non-200s, latency outside the swap seconds, answers per model_version."""
    from loadtest.swaps import main

    raise typer.Exit(main(rate, phase_s, versions, config))


def deadline(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    rates: Annotated[str, typer.Option(help="comma-separated req/s, run one after another")] = "100,150,200,250,300",
    seconds: Annotated[float, typer.Option(help="seconds at each rate")] = 60.0,
    out: Annotated[Path, typer.Option(help="where deadline.md and the server log go")] = Path("loadtest/results"),
    locust_seconds: Annotated[
        float | None, typer.Option(help="Locust at each rate after the open loop (default: --seconds; 0: none)")
    ] = None,
) -> None:
    """Open-loop load at several rates against a real server: client and service p99, degraded and 503 shares, the
    503s' latency, beside the GEMM peak and Locust at the same rates (issue 26)."""
    from loadtest.deadline import main

    locust_s = seconds if locust_seconds is None else locust_seconds
    raise typer.Exit(main(config, artifacts, repo, [float(r) for r in rates.split(",")], seconds, out, locust_s))
