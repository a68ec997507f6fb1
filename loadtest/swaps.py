"""Version swaps under steady load (issue 25): a real `falconrec serve` follows a versions directory while an
open-loop stream of POST /v1/recommend runs at a fixed rate; three promotions and one rollback happen during it.

Prints, per phase between swaps and overall: answers, non-200s, client p50/p99, the p99 outside the second after
each swap (the warm-up second), and which model_version answered. For the tiny config it builds the versions it
needs (other training seeds) when --versions has fewer than three; for another config --versions must hold three
of that config (e.g. `falconrec build --config C --add-version` three times, with other seeds or epochs).

    falconrec swaps --rate 100 --phase-s 15
    falconrec swaps --config ml1m --versions versions --rate 100 --phase-s 20
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from loadtest.procs import pct, start_serve, stop_group
from service.versions import VersionStore

PLAN = ("v2", "v3", "v1", "rollback")  # three promotions, then back to the one before the last


@dataclasses.dataclass
class Answer:
    t: float  # seconds since the stream began (scheduled send)
    status: int
    latency_ms: float
    model_version: str | None


def ensure_versions(root: Path, work: Path, n: int = 3) -> VersionStore:
    """At least `n` versions of the tiny config (other training seeds), v1 current; built and added through the CLI
    (this package sits below `falconrec`)."""
    from training.config import CONFIG_DIR

    vs = VersionStore(root)
    cli = [sys.executable, "-m", "falconrec.cli"]
    for seed in range(len(vs.ids()), n):
        cfg = work / f"seed{seed}" / "tiny.toml"  # named tiny: the versions serve the tiny config
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"seed = {seed}\n" + (CONFIG_DIR / "tiny.toml").read_text())
        where = ["--artifacts", str(cfg.parent / "artifacts"), "--repo", str(cfg.parent / "model_repository")]
        subprocess.run([*cli, "build", "--config", str(cfg), *where], check=True, capture_output=True)
        add = [*cli, "models", "add", "--config", str(cfg), *where, "--versions", str(root), "--note", f"seed {seed}"]
        subprocess.run(add, check=True, capture_output=True)
    vs.set_current(vs.ids()[0])
    return vs


def start_server(root: Path, log: Path, config: str = "tiny") -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "FALCONREC_REDIS_URL"}  # the driver writes the file pointer
    env |= {"FALCONREC_VERSIONS_DIR": str(root), "FALCONREC_VERSION_POLL_S": "0.2"}
    return start_serve(["--config", config], env, log, timeout_s=300)


def existing_versions(root: Path, config: str, n: int = 3) -> VersionStore:
    """A versions directory made elsewhere: its first `n` versions must be of `config`; the first becomes current."""
    vs = VersionStore(root)
    ids = vs.ids()
    if len(ids) < n or any(vs.info(v).config != config for v in ids[:n]):
        have = ", ".join(f"{v} ({vs.info(v).config})" for v in ids) or "none"
        raise SystemExit(f"{root}: needs {n} versions of {config!r} (has {have}); add builds with `falconrec build "
                         f"--config {config} --add-version --versions {root}`")  # fmt: skip
    vs.set_current(ids[0])
    return vs


async def stream(url: str, users: list[int], rate: float, seconds: float) -> list[Answer]:
    out: list[Answer] = []
    loop = asyncio.get_running_loop()

    async def one(c: httpx.AsyncClient, due: float, t0: float, u: int) -> None:
        try:
            r = await c.post("/v1/recommend", json={"user_id": u, "k": 10})
            mv = r.json().get("model_version") if r.status_code == 200 else None
            out.append(Answer(due - t0, r.status_code, (loop.time() - due) * 1000, mv))
        except httpx.HTTPError:
            out.append(Answer(due - t0, 0, (loop.time() - due) * 1000, None))

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as c:
        t0 = loop.time()
        tasks = []
        for i in range(int(rate * seconds)):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            tasks.append(asyncio.create_task(one(c, due, t0, users[i % len(users)])))
        await asyncio.gather(*tasks)
    return out


async def run(vs: VersionStore, url: str, users: list[int], rate: float, phase_s: float) -> tuple[list, list]:
    swaps: list[tuple[float, str]] = []

    async def drive() -> None:
        t0 = time.monotonic()
        for k, step in enumerate(PLAN, 1):
            await asyncio.sleep(max(0.0, k * phase_s - (time.monotonic() - t0)))
            if step == "rollback":
                target = vs.rollback()
            else:
                vs.set_current(step)
                target = step
            swaps.append((time.monotonic() - t0, target))

    answers, _ = await asyncio.gather(stream(url, users, rate, phase_s * (len(PLAN) + 1)), drive())
    return answers, swaps


def report(answers: list[Answer], swaps: list[tuple[float, str]], rate: float) -> str:
    lat = [a.latency_ms for a in answers]
    outside = [a.latency_ms for a in answers if not any(0 <= a.t - t < 1.0 for t, _ in swaps)]
    bad = Counter(a.status for a in answers if a.status != 200)
    versions = Counter(a.model_version for a in answers if a.status == 200)
    lines = [
        f"## Version swaps under load: {rate:g} req/s, {len(answers)} requests",
        "",
        f"- swaps at {', '.join(f'{t:.1f} s -> {v}' for t, v in swaps)}",
        f"- non-200 answers: {sum(bad.values())} {dict(bad) or ''}",
        f"- client latency p50 / p99: {pct(lat, 50, 1)} / {pct(lat, 99, 1)} ms; "
        f"p99 outside the second after each swap: {pct(outside, 99, 1)} ms; max {max(lat):.1f} ms",
        f"- answers per model_version: {dict(versions)}",
    ]
    return "\n".join(lines)


def main(rate: float = 100.0, phase_s: float = 15.0, versions: Path | None = None, config: str = "tiny") -> int:
    from service.artifacts import config_name

    work = Path(tempfile.mkdtemp(prefix="falconrec-swaps-"))
    root = versions or work / "versions"
    name = config_name(config)
    vs = ensure_versions(root, work) if name == "tiny" else existing_versions(root, name)
    proc, url = start_server(root, work / "server.log", config)
    try:
        users = [int(u) for u in np.load(vs.artifacts(vs.ids()[0]) / name / "data.npz")["user_raw_ids"][:50]]
        answers, swaps = asyncio.run(run(vs, url, users, rate, phase_s))
    finally:
        stop_group(proc)
    print(report(answers, swaps, rate))
    return 0 if all(a.status == 200 for a in answers) else 1


if __name__ == "__main__":
    raise SystemExit(main())
