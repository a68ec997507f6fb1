"""Shared fixtures: one tiny build per session (real text model, real training, real ONNX export)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# The process plumbing lives in loadtest/procs.py (the hardening harness uses it too); tests import it from here.
from loadtest.procs import RedisProcess, free_port, kill_process_group  # noqa: F401 - re-exported

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
def second_build(tiny_build, tmp_path_factory) -> TinyBuild:
    """Another version of the tiny config: another training seed and fewer epochs, so other weights (the version
    swaps' second version: tests/test_versions.py, tests/test_triton.py)."""
    import dataclasses

    from falconrec.build import Builder
    from training.config import load_config

    cfg = load_config("tiny")
    cfg = dataclasses.replace(
        cfg,
        seed=cfg.seed + 1,
        ranker=dataclasses.replace(cfg.ranker, epochs=3),
        towers=dataclasses.replace(cfg.towers, epochs=3),
        sasrec=dataclasses.replace(cfg.sasrec, epochs=1),
    )
    tb = TinyBuild(tmp_path_factory.mktemp("v2"))
    Builder(cfg, tb.artifacts, tb.repo, log=lambda m: None).build()
    return tb


@pytest.fixture(scope="session")
def server(tiny_build):
    s = RunningServer(server_settings(tiny_build))
    yield s
    s.stop()


REDIS_URL = os.environ.get("FALCONREC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
