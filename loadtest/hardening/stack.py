"""The processes every part runs against: a private redis-server loaded with `falconrec load-redis`, and `falconrec
serve` on it as a subprocess (its own session, so that signals sent to it and its worker never reach the harness)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from loadtest.hardening.options import Options
from loadtest.procs import LOOPBACK, RedisProcess, free_port, stop_group
from service.artifacts import ArtifactPaths


@dataclass
class Stack:
    """What the parts need to reach the server, attack it and restore Redis."""

    opts: Options
    redis: RedisProcess
    server: subprocess.Popen
    http_url: str
    grpc_target: str
    env: dict[str, str]
    write_key: str
    users: np.ndarray  # most active first
    weights: np.ndarray  # Zipf draw weights of `users`
    items: np.ndarray  # the build's item ids
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.opts.out

    @property
    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.write_key}"}

    def server_setting(self, name: str) -> str:
        """A FALCONREC_* setting as the server got it ('default' when the environment does not set it)."""
        return self.env.get(name, "default")


def service_env(opts: Options, redis_url: str, write_key: str, extra: dict[str, str]) -> dict[str, str]:
    """The server's environment: none of the caller's FALCONREC_* (a run must not depend on the shell it came from),
    the harness's settings, each part's own (`extra`), then --server-env, which wins."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCONREC_")}
    env.update(
        {
            "FALCONREC_REDIS_URL": redis_url,  # the environment, not argv (the loader reads it too)
            "FALCONREC_BUDGET_MS": str(opts.budget_ms),
            "FALCONREC_HOST": LOOPBACK,
            "FALCONREC_API_KEYS": json.dumps([f"write:{write_key}"]),  # the write parts POST events and items
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **extra,
        }
    )
    for pair in opts.server_env:
        key, _, value = pair.partition("=")
        env[key] = value
    return env


def load_redis(opts: Options, env: dict[str, str], log: Path) -> float:
    """`falconrec load-redis` into the private Redis; returns its seconds."""
    t = time.monotonic()
    cmd = [sys.executable, "-m", "falconrec.cli", "load-redis", "--config", opts.config]
    cmd += ["--artifacts", str(opts.artifacts), "--repo", str(opts.repo)]
    with open(log, "a") as f:
        f.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=opts.load_timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"load-redis ran over {opts.load_timeout_s} s (see {log})") from None
        finally:
            stop_group(proc)
    if rc != 0:
        raise RuntimeError(f"load-redis failed with {rc} (see {log})")
    return time.monotonic() - t


def start_server(opts: Options, env: dict[str, str], port: int, grpc_port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "falconrec.cli", "serve", "--config", opts.config, "--host", LOOPBACK]
    cmd += ["--port", str(port), "--grpc-port", str(grpc_port)]
    cmd += ["--artifacts", str(opts.artifacts), "--repo", str(opts.repo)]
    f = open(log, "a")  # noqa: SIM115 - the child keeps writing to it; closed by the OS at exit
    f.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
    f.flush()
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Poll /readyz until status ok; returns the seconds it took."""
    t = time.monotonic()
    with httpx.Client(base_url=url, timeout=2.0) as c:
        while time.monotonic() - t < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} (see server.log)")
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = c.get("/readyz")
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return time.monotonic() - t
            time.sleep(0.25)
    raise RuntimeError(f"the server was not ready within {timeout_s} s (see server.log)")


def users_of(opts: Options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, most active first; their draw weights; item ids) from the build's data."""
    z = np.load(ArtifactPaths.for_config(opts.config, opts.artifacts).data, allow_pickle=False)
    order = np.argsort(-z["lengths"], kind="stable")
    users = z["user_raw_ids"][order].astype(np.int64)
    w = 1.0 / np.arange(1, len(users) + 1) ** opts.zipf
    return users, w / w.sum(), z["item_raw_ids"].astype(np.int64)


def warm_up(url: str, users: np.ndarray, n: int) -> None:
    """Sequential requests first: the first calls allocate and compile; no part should time those."""
    with httpx.Client(base_url=url, timeout=30.0) as c:
        for i in range(n):
            c.post("/v1/recommend", json={"user_id": int(users[i % len(users)])})


@contextlib.contextmanager
def running(opts: Options, extra_env: dict[str, str]) -> Iterator[Stack]:
    """Redis, loaded, and a ready, warmed-up server; every process stopped on the way out, whatever happened."""
    for name in ("server.log", "load-redis.log"):
        (opts.out / name).unlink(missing_ok=True)
    users, weights, items = users_of(opts)
    redis = RedisProcess(start=False)
    server: subprocess.Popen | None = None
    key = opts.write_key or secrets.token_hex(16)
    try:
        redis.start()
        env = service_env(opts, redis.url, key, extra_env)
        loaded_s = load_redis(opts, env, opts.out / "load-redis.log")
        port, grpc_port = free_port(), free_port()
        server = start_server(opts, env, port, grpc_port, opts.out / "server.log")
        url = f"http://{LOOPBACK}:{port}"
        ready_s = wait_ready(url, server, opts.startup_timeout_s)
        warm_up(url, users, opts.warmup)
        timings = {"load_redis_s": loaded_s, "ready_s": ready_s}
        yield Stack(opts, redis, server, url, f"{LOOPBACK}:{grpc_port}", env, key, users, weights, items, timings)
    finally:
        stop_group(server)
        redis.kill()
