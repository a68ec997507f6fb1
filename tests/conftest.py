"""Shared fixtures: one tiny build per session (real text model, real training, real ONNX export)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
ML1M = ROOT.parent / "shared" / "data" / "ml-1m"


class TinyBuild:
    def __init__(self, base: Path):
        self.artifacts = base / "artifacts"
        self.repo = base / "model_repository"
        self.config = "tiny"
        self.seconds = 0.0
        self.results = []

    @property
    def paths(self):
        from service.artifacts import ArtifactPaths

        return ArtifactPaths.for_config(self.config, self.artifacts)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> TinyBuild:
    # FALCONREC_TEST_PREBUILT=DIR serves a tiny build made earlier in DIR as it is (iterating on the service
    # while the offline code is mid-change); CI leaves it unset and builds afresh.
    prebuilt = os.environ.get("FALCONREC_TEST_PREBUILT")
    if prebuilt:
        return TinyBuild(Path(prebuilt))
    from falconrec.build import Builder
    from training.config import load_config

    tb = TinyBuild(tmp_path_factory.mktemp("tiny"))
    t = time.time()
    tb.results = Builder(load_config("tiny"), tb.artifacts, tb.repo, log=lambda m: None).build()
    tb.seconds = time.time() - t
    return tb


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A real uvicorn + gRPC server in a background thread, on free loopback ports."""

    def __init__(self, settings):
        import threading

        import uvicorn

        from service.api.app import create_app
        from service.server import uvicorn_config

        self.settings = settings
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn_config(self.app, settings))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{settings.port}"

    @property
    def components(self):
        return self.app.state.components

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def server_settings(tiny_build, **overrides):
    from service.settings import Settings

    base = dict(
        config="tiny",
        artifacts_dir=tiny_build.artifacts,
        model_repository=tiny_build.repo,
        port=free_port(),
        grpc_port=free_port(),
        budget_ms=2000.0,
        max_budget_ms=5000.0,
    )
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="session")
def server(tiny_build):
    s = RunningServer(server_settings(tiny_build))
    yield s
    s.stop()


REDIS_URL = os.environ.get("FALCONREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


class RedisProcess:
    """A redis-server of the test's own on a free port (the shared one on 6379 is never killed or frozen)."""

    def __init__(self, port: int | None = None, password: str | None = None):
        self.port = port or free_port()
        self.password = password
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        import redis

        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                redis.Redis(port=self.port, password=self.password).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        """Freeze it (SIGSTOP): connections stay open and nothing answers, the worst kind of outage."""
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL works on a stopped process too
            self.proc.wait()


def kill_process_group(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True and everything it started (tritonserver's Python
    backend stubs outlived the server when only its pid was killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=30)
