"""`falconrec` command line. Offline commands import training/exporters (torch) lazily, so a serving-only
install (no `train` extra) still runs `serve`, `load-redis` and `loadtest`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.artifacts import DEFAULT_ARTIFACTS, DEFAULT_REPOSITORY

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)

ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="build config: tiny, ml1m, ml1m-large or a .toml path")]
ArtifactsOpt = Annotated[Path, typer.Option(help="where artifacts/<config>/ live")]
RepoOpt = Annotated[Path, typer.Option("--repo", help="Triton model repository to write/serve")]


def _default_config() -> str:
    return os.environ.get("FALCONREC_CONFIG", "ml1m")


def _offline():
    try:
        from training.config import load_config
        from training.pipeline import Builder
    except ImportError as e:  # torch & co. live in the `train` extra
        console.print(f"[red]offline commands need the train extra ({e}); pip install -e '.[train]'[/red]")
        raise typer.Exit(2) from e
    return load_config, Builder


def _builder(
    config: str,
    artifacts: Path,
    repo: Path,
    data_dir: Path | None = None,
    download: bool = False,
    force: bool = False,
    tensorrt: bool = False,
):
    load_config, Builder = _offline()
    try:
        cfg = load_config(config)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    return Builder(
        cfg,
        artifacts,
        repo,
        data_dir=data_dir,
        download=download,
        force=force,
        log=lambda m: console.print(m),
        tensorrt=tensorrt,
    )


def _print_summary(results) -> None:
    from training.pipeline import summary_rows

    t = Table(title="falconrec build")
    for col in ("step", "status", "time", "size", "result"):
        t.add_column(col)
    for row in summary_rows(results):
        t.add_row(*row)
    Console().print(t)


def _run_steps(b, until: str, only: set[str] | None = None) -> None:
    from training.data import DatasetError

    order = ["data", "embed", "train", "export", "index"]
    try:
        ds = b.data()
        if order.index(until) >= 1:
            emb, meta = b.embed(ds)
        if order.index(until) >= 2:
            b.train(ds, emb, only)
        if order.index(until) >= 3:
            manifest = b.export(ds, emb, meta)
        if order.index(until) >= 4:
            b.index(ds, emb, manifest)
    except DatasetError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    _print_summary(b.results)


@app.command()
def build(
    config: ConfigOpt = _default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    data_dir: Annotated[Path | None, typer.Option(help="MovieLens-1M directory (default: FALCONREC_DATA_DIR)")] = None,
    download: Annotated[bool, typer.Option(help="download ml-1m.zip (SHA-256 checked) if missing")] = False,
    force: Annotated[bool, typer.Option(help="re-run every step")] = False,
    tensorrt: Annotated[bool, typer.Option(help="add the TensorRT FP16 accelerator to config.pbtxt")] = False,
) -> None:
    """Data -> LLM embeddings -> train towers, HSTU, SASRec -> ONNX + config.pbtxt -> FAISS index."""
    _run_steps(_builder(config, artifacts, repo, data_dir, download, force, tensorrt), "index")


@app.command()
def embed(
    config: ConfigOpt = _default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    data_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Item text -> frozen text model -> mean-pooled content embeddings (float16, cached by text hash)."""
    _run_steps(_builder(config, artifacts, DEFAULT_REPOSITORY, data_dir), "embed")


@app.command()
def train(
    config: ConfigOpt = _default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    models: Annotated[str, typer.Option(help="comma list of towers, ranker, sasrec")] = "towers,ranker,sasrec",
) -> None:
    """Train the LEARN towers, the HSTU ranker and the SASRec baseline (after data and embed)."""
    only = {m.strip() for m in models.split(",") if m.strip()}
    unknown = only - {"towers", "ranker", "sasrec"}
    if unknown:
        console.print(f"[red]unknown models {sorted(unknown)}: choose from towers, ranker, sasrec[/red]")
        raise typer.Exit(2)
    _run_steps(_builder(config, artifacts, DEFAULT_REPOSITORY, data_dir), "train", only)


@app.command()
def export(
    config: ConfigOpt = _default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    tensorrt: Annotated[bool, typer.Option()] = False,
) -> None:
    """Write the Triton model repository (ONNX + config.pbtxt) and the FAISS index (no training)."""
    _run_steps(_builder(config, artifacts, repo, tensorrt=tensorrt), "index", only=set())


@app.command("eval")
def eval_(
    config: ConfigOpt = _default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    max_users: Annotated[int | None, typer.Option(help="evaluate the first N users only")] = None,
) -> None:
    """HR@10/NDCG@10/HR@50/HR@200 on the paper's protocol and the unfiltered one: popularity, SASRec, HSTU, cascade."""
    _offline()
    from training.evaluate import evaluate

    out = evaluate(config, artifacts, repo, max_users, log=lambda m: console.print(m))
    for proto, rows in out["results"].items():
        t = Table(
            title=f"{out['dataset']} leave-one-out test, {out['users']} users, {out['items']} items — "
            f"protocol '{proto}': {out['protocols'][proto]}"
        )
        for col in ("model", "HR@10", "NDCG@10", "HR@50", "HR@200"):
            t.add_column(col)
        # The paper's rows are on its own protocol: shown beside ours on that one only.
        shown = {**rows, **out["paper"]} if proto == "paper" else rows
        for name, m in shown.items():
            t.add_row(name, *(f"{m[k]:.4f}" if k in m else "-" for k in ("hr@10", "ndcg@10", "hr@50", "hr@200")))
        Console().print(t)
    console.print(f"wrote {artifacts / 'eval.json'}")


@app.command("cold-start")
def cold_start(
    config: ConfigOpt = "ml1m-cold",
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    data_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Hold a fraction of items out of training; cascade HR@10/NDCG@10 on them, content+ID vs ID-only."""
    b = _builder(config, artifacts, DEFAULT_REPOSITORY, data_dir)
    from training.coldstart import run
    from training.data import DatasetError

    try:
        ds = b.data()
        emb, _ = b.embed(ds)
    except DatasetError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    out = run(b.cfg, ds, emb, b.paths.root, log=lambda m: console.print(m))
    t = Table(
        title=f"cold items: {out['held_out_items']} of {out['items']} held out of training; "
        f"{out['cold_test_events']} test events with a cold target (paper protocol; chance HR@10 "
        f"{out['chance_hr@10']:.4f})"
    )
    for col in ("model", "HR@10", "NDCG@10", "HR@50", "HR@200"):
        t.add_column(col)
    for name, m in out["results"].items():
        t.add_row(name, *(f"{m[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@50", "hr@200")))
    Console().print(t)
    console.print(f"wrote {b.paths.root / 'cold_start.json'}")


@app.command()
def serve(
    config: ConfigOpt = _default_config(),
    host: Annotated[str | None, typer.Option(help="HTTP host (FALCONREC_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (FALCONREC_PORT)")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port, 0 = off (FALCONREC_GRPC_PORT)")] = None,
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    redis_url: Annotated[str | None, typer.Option(help="read embeddings/histories from Redis")] = None,
    build_if_missing: Annotated[bool, typer.Option(help="run `build` first when artifacts are missing")] = False,
    workers: Annotated[
        int | None, typer.Option(help="server processes on the port (FALCONREC_WORKERS; writes need Redis when > 1)")
    ] = None,
) -> None:
    """Serve /v1/recommend and /v1/score over HTTP and Recommend/ScoreBatch over gRPC."""
    from service.api.app import run
    from service.contract import Manifest
    from service.settings import Settings

    overrides = {
        k: v
        for k, v in {
            "config": config,
            "host": host,
            "port": port,
            "grpc_port": grpc_port,
            "artifacts_dir": artifacts,
            "model_repository": repo,
            "redis_url": redis_url,
            "workers": workers,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    from service.artifacts import ArtifactPaths, config_name
    from service.contract import MANIFEST

    ready = (Path(repo) / MANIFEST).exists() and ArtifactPaths.for_config(config, artifacts).index_dir.exists()
    ready = ready and Manifest.read(Path(repo)).config == config_name(config)
    if not ready:
        if not build_if_missing:
            console.print(
                f"[red]no built artifacts for {config!r} in {repo}; run `falconrec build --config {config}` "
                "or pass --build-if-missing[/red]"
            )
            raise typer.Exit(2)
        _run_steps(_builder(config, artifacts, repo), "index")
    run(settings)


@app.command("load-redis")
def load_redis_cmd(
    config: ConfigOpt = _default_config(),
    redis_url: Annotated[
        str, typer.Option(envvar="FALCONREC_REDIS_URL", help="redis://host:port/db")
    ] = "redis://127.0.0.1:6379/0",
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    keep_old: Annotated[bool, typer.Option(help="keep the previous version's keys")] = False,
) -> None:
    """Write content embeddings (float16) and user histories to Redis, then flip the version pointer."""
    from exporters.redis_loader import load_redis

    out = load_redis(redis_url, config, artifacts, repo, keep_old=keep_old)
    console.print(out)


@app.command()
def ingest(
    repo: RepoOpt = DEFAULT_REPOSITORY,
    redis_url: Annotated[
        str | None, typer.Option(envvar="FALCONREC_REDIS_URL", help="prefer the env var: ps shows argv")
    ] = None,
    batch: Annotated[int, typer.Option(help="texts per model call")] = 32,
    claim_after_s: Annotated[float, typer.Option(help="take over jobs another worker left unacknowledged")] = 30.0,
) -> None:
    """Ingestion worker: POST /v1/items texts from Redis -> the build's text model -> content embeddings into the
    live version and the item log every replica tails. Run one or more beside the API (needs the train extra)."""
    if not redis_url:
        console.print("[red]set FALCONREC_REDIS_URL (without Redis the API runs its own worker)[/red]")
        raise typer.Exit(2)
    _offline()
    from service.ingest.worker import main as worker_main

    os.environ["FALCONREC_REDIS_URL"] = redis_url  # the worker reads it from the environment, never argv
    worker_main(["--repo", str(repo), "--batch", str(batch), "--claim-after-s", str(claim_after_s)])


@app.command("triton-local")
def triton_local(
    repo: RepoOpt = DEFAULT_REPOSITORY,
    grpc_port: Annotated[int, typer.Option(help="Triton gRPC port")] = 8001,
    http_port: Annotated[int, typer.Option(help="Triton HTTP port (8000 is the API's)")] = 9000,
    workdir: Annotated[Path, typer.Option(help="where the twin repository and the server log go")] = Path(
        "artifacts/triton-local"
    ),
) -> None:
    """Run a real Triton server here without Docker: the `tritonserver` bundled in nvidia-pytriton
    (.venv-triton, made by tests/setup_triton.sh) on a Python-backend twin of the repository that runs the
    same ONNX files. For trying FALCONREC_BACKEND=triton locally; production uses the NGC image."""
    import signal
    import time

    from exporters.triton_local import DEFAULT_VENV, find_tritonserver, start_tritonserver
    from exporters.triton_twin import write_twin

    if find_tritonserver(DEFAULT_VENV) is None:
        console.print(f"[red]no tritonserver in {DEFAULT_VENV}: run `bash tests/setup_triton.sh` first[/red]")
        raise typer.Exit(2)
    twin = write_twin(repo, workdir / "repo")
    t = start_tritonserver(twin, DEFAULT_VENV, workdir / "tritonserver.log", http_port=http_port, grpc_port=grpc_port)
    console.print(
        f"tritonserver ready: gRPC {t.grpc_url}, HTTP {t.http_url} (log {t.log_path}). Serve through it with\n"
        f"  FALCONREC_BACKEND=triton FALCONREC_TRITON_URL={t.grpc_url} falconrec serve --port 8000"
    )
    signal.signal(signal.SIGTERM, lambda *_: t.kill())
    try:
        while t.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        t.kill()


@app.command()
def loadtest(
    host: Annotated[str, typer.Option(help="running server")] = "http://127.0.0.1:8000",
    config: ConfigOpt = _default_config(),
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


@app.command("ingest-latency")
def ingest_latency(
    host: Annotated[str, typer.Option(help="replica to POST /v1/items to")] = "http://127.0.0.1:8000",
    replica: Annotated[str | None, typer.Option(help="replica to watch (default: --host)")] = None,
    config: ConfigOpt = _default_config(),
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


@app.command()
def bench(
    config: ConfigOpt = _default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    requests: Annotated[int, typer.Option(help="requests for the per-stage breakdown")] = 50,
    repeat: Annotated[int, typer.Option(help="timed repeats per ranking cell (median)")] = 3,
) -> None:
    """Per-stage latency of one request; M-FALCON vs naive vs per-candidate; ORT vs torch eager."""
    _offline()
    from service.contract import Manifest
    from training.bench import efficiency_table, ranking_table, stage_breakdown

    cold = stage_breakdown(config, artifacts, repo, requests)
    warm = stage_breakdown(config, artifacts, repo, requests, cached=True)
    t = Table(title=f"one /v1/recommend, in-process ({config}), median of {requests} users")
    t.add_column("stage")
    t.add_column("ms, caches off", justify="right")
    t.add_column("ms, history unchanged (cached)", justify="right")
    for k in dict.fromkeys([*cold, *warm]):
        fmt = (lambda v: f"{v:.0f}") if "candidates" in k else (lambda v: f"{v:.2f}")
        t.add_row(k, *(fmt(d[k]) if k in d else "-" for d in (cold, warm)))
    Console().print(t)
    mb = Manifest.read(repo).microbatch
    eff = efficiency_table(config, artifacts, repo, mb)
    t = Table(
        title=f"served graphs on 1 thread vs this machine's GEMM peak ({eff['gemm_peak_gflops']:.1f} GFLOP/s, "
        "torch float32 512^3, 1 thread, same run)"
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


@app.command("bench-index")
def bench_index(
    config: ConfigOpt = _default_config(),
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
    _offline()
    from training.scale import index_scale_bench

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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("falconrec").setLevel(os.environ.get("FALCONREC_LOG_LEVEL", "INFO"))
    app()


if __name__ == "__main__":
    main()
