"""The online commands: serve, load-redis, the ingestion worker, a local Triton."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from falconrec.offline import builder, require_offline, run_steps
from falconrec.options import ArtifactsOpt, ConfigOpt, RepoOpt, console, default_config
from service.artifacts import DEFAULT_ARTIFACTS, DEFAULT_REPOSITORY


def serve(
    config: ConfigOpt = default_config(),
    host: Annotated[str | None, typer.Option(help="HTTP host (FALCONREC_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (FALCONREC_PORT)")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port, 0 = off (FALCONREC_GRPC_PORT)")] = None,
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    redis_url: Annotated[str | None, typer.Option(help="histories, events and live items in Redis")] = None,
    build_if_missing: Annotated[bool, typer.Option(help="run `build` first when artifacts are missing")] = False,
    workers: Annotated[
        int | None, typer.Option(help="server processes on the port (FALCONREC_WORKERS; writes need Redis when > 1)")
    ] = None,
    versions: Annotated[
        Path | None,
        typer.Option(
            envvar="FALCONREC_VERSIONS_DIR",
            help="serve the version CURRENT names there and follow it (`falconrec models`), not --artifacts/--repo",
        ),
    ] = None,
) -> None:
    """Serve /v1/recommend and /v1/score over HTTP and Recommend/ScoreBatch over gRPC."""
    from service.contract import Manifest
    from service.server import run
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
            "versions_dir": versions,
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    if versions is not None:
        run(settings)  # the versions directory says what to serve (service/components.served_paths)
        return
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
        run_steps(builder(config, artifacts, repo), "index")
    run(settings)


def load_redis_cmd(
    config: ConfigOpt = default_config(),
    redis_url: Annotated[
        str, typer.Option(envvar="FALCONREC_REDIS_URL", help="redis://host:port/db")
    ] = "redis://127.0.0.1:6379/0",
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    keep_old: Annotated[bool, typer.Option(help="keep the previous version's keys")] = False,
) -> None:
    """Write user histories to Redis, then flip the version pointer (and delete content-embedding keys older
    versions of this command wrote: requests read none)."""
    from exporters.redis_loader import load_redis

    out = load_redis(redis_url, config, artifacts, repo, keep_old=keep_old)
    console.print(out)


def ingest(
    repo: RepoOpt = DEFAULT_REPOSITORY,
    redis_url: Annotated[
        str | None, typer.Option(envvar="FALCONREC_REDIS_URL", help="prefer the env var: ps shows argv")
    ] = None,
    batch: Annotated[int, typer.Option(help="texts per model call")] = 32,
    claim_after_s: Annotated[float, typer.Option(help="take over jobs another worker left unacknowledged")] = 30.0,
    stdio: Annotated[
        bool, typer.Option(help="JSON lines on stdin/stdout instead of Redis (the API's own child)")
    ] = False,
    text_model: Annotated[
        str | None, typer.Option(help="default: the build config's (checked against the manifest)")
    ] = None,
    parent_pid: Annotated[int | None, typer.Option(help="exit when this process is gone")] = None,
    reclaim_from: Annotated[
        str | None, typer.Option(help="a dead worker's consumer name: take its jobs at once")
    ] = None,
    nice: Annotated[
        int, typer.Option(min=0, max=19, help="lower this process's CPU priority (the API's child: 10)")
    ] = 0,
) -> None:
    """Ingestion worker: POST /v1/items texts from Redis -> the build's text model -> content embeddings into the
    live version's item log, which every replica tails (and computes the items' tokens from). Run one or more beside
    the API (needs the train extra); the API also runs one as its child (--stdio without Redis)."""
    if not redis_url and not stdio:
        console.print("[red]set FALCONREC_REDIS_URL (without Redis the API runs its own worker)[/red]")
        raise typer.Exit(2)
    if nice:  # before any import starts a thread: niceness is per thread on Linux, and new threads inherit it
        os.nice(nice)
    require_offline()
    from training.ingest_worker import run

    if redis_url:
        os.environ["FALCONREC_REDIS_URL"] = redis_url  # the worker reads it from the environment, never argv
    run(repo, batch, stdio, text_model, parent_pid, claim_after_s, reclaim_from)


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
