"""Every knob of the harness, in one dataclass: its defaults and help are the command line's too (the parser is built
from the fields), and tests build an `Options` directly."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Reliability measurements against a real `falconrec serve` subprocess on a private redis-server: Redis killed "
    "and frozen, wide and cancelled gRPC batches, overload, slow bodies, huge item ids, a killed ingestion worker. "
    "Prints a markdown report (also OUT/hardening.md; raw numbers in OUT/hardening.json)."
)
# The default order; each part is one module (grpc: scorebatch.py, the others by their name).
PART_NAMES = ("outage", "grpc", "overload", "slowbody", "hugeids", "freeze", "workerkill")


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(x.strip() for x in text.split(",") if x.strip())
    if unknown := sorted(set(parts) - set(PART_NAMES)):
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}; known: {','.join(PART_NAMES)}")
    return parts


def opt(default: Any, help: str, group: str = "", parse: Callable[[str], Any] | None = None) -> Any:
    """A field that is also a command-line option (`--name-with-dashes`); `parse` reads its text."""
    if isinstance(default, list | tuple):
        kw: dict[str, Any] = {"default_factory": lambda: type(default)(default)}
    else:
        kw = {"default": default}
    return field(**kw, metadata={"help": help, "group": group, "parse": parse})


@dataclass
class Options:
    # --- the build, the server, the background load
    config: str = opt("ml1m", "build config (tiny, ml1m, ...)")
    artifacts: Path = opt(Path("artifacts"), "the build's artifacts directory", parse=Path)
    repo: Path = opt(Path("model_repository"), "the build's model repository", parse=Path)
    out: Path = opt(Path("loadtest/results/hardening"), "hardening.md/.json and the logs go here", parse=Path)
    parts: tuple[str, ...] = opt(PART_NAMES, f"comma-separated subset of {','.join(PART_NAMES)}", parse=parse_parts)
    rate: float = opt(20.0, "background POST /v1/recommend rate, req/s (Poisson)")
    k: int = opt(10, "k of each recommend request")
    zipf: float = opt(1.07, "user skew (0: uniform), as loadtest/locustfile.py")
    seed: int = opt(0, "seed of every random draw")
    budget_ms: float = opt(20.0, "FALCONREC_BUDGET_MS of the server")
    server_env: list[str] = opt([], "more server settings, FALCONREC_X=V (repeatable)")
    request_timeout_s: float = opt(10.0, "HTTP client timeout")
    warmup: int = opt(50, "sequential requests before measuring")
    startup_timeout_s: float = opt(600.0, "limit for the server to say ready")
    load_timeout_s: float = opt(600.0, "limit for one load-redis")
    # --- 1. outage
    healthy_s: float = opt(10.0, "before the kill", "outage")
    outage_s: float = opt(90.0, "Redis dead this long", "outage")
    after_s: float = opt(20.0, "after the reload", "outage")
    # --- 2. grpc
    batch_users: int = opt(1000, "users of the wide ScoreBatch", "grpc")
    batch_items: int = opt(1000, "items per user", "grpc")
    batch_deadline_s: float = opt(30.0, "client deadline of the wide batch", "grpc")
    batch_budget_ms: float = opt(0.0, "per user; 0: the service default", "grpc")
    cancel_users: int | None = opt(None, "users of the cancelled batch (default: --batch-users)", "grpc", int)
    cancel_after_s: float = opt(2.0, "client timeout of the cancelled batch", "grpc")
    cpu_window_s: float = opt(10.0, "server CPU watched this long after the cancel", "grpc")
    cpu_step_s: float = opt(0.5, "CPU sample step", "grpc")
    idle_s: float = opt(3.0, "idle CPU baseline before the cancelled batch", "grpc")
    busy_cores: float = opt(0.1, "a CPU slice above this counts as busy", "grpc")
    # --- 3. overload
    overload_rate: float = opt(200.0, "open-loop arrivals, req/s", "overload")
    overload_s: float = opt(30.0, "seconds of arrivals", "overload")
    overload_connections: int = opt(200, "client connections at most", "overload")
    # --- 4. slowbody
    slow_sockets: int = opt(80, "sockets that send a head and no body (more than the 64 admission slots)", "slowbody")
    slow_wait_s: float = opt(120.0, "how long to wait for the server to answer them", "slowbody")
    slow_after_s: float = opt(2.0, "normal traffic goes on this long after the last answer", "slowbody")
    # --- 5. hugeids
    huge_from: int = opt(21, "first id 2^from - 1", "hugeids")
    huge_to: int = opt(26, "last id 2^to - 1", "hugeids")
    huge_burst: int = opt(200, "then this many one-item POSTs at once, random ids in [2^32, 2^63)", "hugeids")
    huge_concurrency: int = opt(8, "POSTs of the burst in flight at once", "hugeids")
    probe_path: str = opt("/healthz", "what the stall probe GETs", "hugeids")
    probe_interval_ms: float = opt(10.0, "pause between probe requests", "hugeids")
    item_wait_s: float = opt(300.0, "limit for items to become servable (a worker start loads torch)", "hugeids")
    # --- 6. freeze
    freeze_batches: int = opt(5, "batches sent with Redis frozen, retried with their Idempotency-Key", "freeze")
    freeze_unkeyed: int = opt(1, "more such batches retried without a key (what the key prevents)", "freeze")
    freeze_events: int = opt(5, "events per batch (one user each)", "freeze")
    freeze_retries: int = opt(10, "503s followed per batch at most", "freeze")
    # --- 7. workerkill
    kill_items: int = opt(30, "items POSTed right before the worker is SIGKILLed", "workerkill")
    kill_wait_s: float = opt(300.0, "limit for all of them to become servable", "workerkill")
    write_key: str = opt("", "the server's write key (empty: a fresh random one)")

    def __post_init__(self) -> None:
        if isinstance(self.parts, str):
            self.parts = parse_parts(self.parts)
        if self.cancel_users is None:
            self.cancel_users = self.batch_users
        for pair in self.server_env:
            if not pair.partition("=")[0].startswith("FALCONREC_"):
                raise ValueError(f"server_env takes FALCONREC_*=value, not {pair!r}")

    def env_value(self, name: str) -> str | None:
        """A server setting given with --server-env (None: not given)."""
        for pair in self.server_env:
            key, _, value = pair.partition("=")
            if key == name:
                return value
        return None


def parser(prog: str = "python -m loadtest.hardening") -> argparse.ArgumentParser:
    """`--name-with-dashes` for every field of Options, grouped by part."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    groups: dict[str, Any] = {"": p}
    for f in fields(Options):
        meta = f.metadata
        g = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, list):
            g.add_argument(flag, action="append", default=default, help=meta["help"])
            continue
        parse = meta["parse"] or type(default)
        shown = ",".join(default) if isinstance(default, tuple) else default
        g.add_argument(flag, type=parse, default=default, help=f"{meta['help']} (default: {shown})")
    return p


def parse_args(argv: list[str] | None, prog: str = "python -m loadtest.hardening") -> Options:
    p = parser(prog)
    ns = p.parse_args(argv)
    try:
        return Options(**vars(ns))
    except ValueError as e:
        p.error(str(e))
        raise  # p.error exits; for the type checker
