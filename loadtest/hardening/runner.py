"""Which parts run, in what order, against one stack; the report they make together."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loadtest.hardening import freeze, hugeids, outage, overload, scorebatch, slowbody, workerkill
from loadtest.hardening.options import PART_NAMES, Options, parse_args
from loadtest.hardening.stack import Stack, running
from loadtest.hardening.stats import server_log_findings

Measure = Callable[[Stack], Awaitable[tuple[str, dict]]]
RUNNERS: dict[str, Measure] = {
    "outage": outage.measure,
    "grpc": scorebatch.measure,
    "overload": overload.measure,
    "slowbody": slowbody.measure,
    "hugeids": hugeids.measure,
    "freeze": freeze.measure,
    "workerkill": workerkill.measure,
}
# Server settings a part needs (the server starts once, for all the parts chosen; --server-env overrides these).
SERVER_ENV: dict[str, Callable[[Options], dict[str, str]]] = {"slowbody": slowbody.server_env}
assert tuple(RUNNERS) == PART_NAMES


@dataclass
class Report:
    markdown: str
    raw: dict[str, Any]  # per part, its numbers (what hardening.json holds)


async def measure(s: Stack) -> tuple[list[str], dict]:
    sections, raw = [], {}
    for i, part in enumerate(s.opts.parts, 1):
        print(f"[hardening] {part} ...", file=sys.stderr, flush=True)
        md, raw[part] = await RUNNERS[part](s)
        sections.append(md.replace("## ", f"## {i}. ", 1))  # numbered in the order they ran
    return sections, raw


def run(opts: Options, command: str = "") -> Report:
    """Start the stack, run the chosen parts, stop everything; write hardening.md and hardening.json to opts.out."""
    opts.out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, str] = {}
    for part in opts.parts:
        extra.update(SERVER_ENV.get(part, lambda _: {})(opts))
    with running(opts, extra) as s:
        sections, raw = asyncio.run(measure(s))
        if s.server.poll() is not None:
            sections.append(f"**The server exited with {s.server.returncode} during the run.**\n")
        head = _head(s, command)
    findings = server_log_findings(opts.out / "server.log")
    tail = "## Server log\n\n" + (
        "".join(f"- {n} × `{line}`\n" for line, n in findings.most_common(15)) or "- no warnings or errors\n"
    )
    md = head + "\n".join(sections) + "\n" + tail
    raw["log_findings"] = dict(findings)
    (opts.out / "hardening.md").write_text(md)
    (opts.out / "hardening.json").write_text(json.dumps(raw, indent=1, default=str))
    return Report(md, raw)


def _head(s: Stack, command: str) -> str:
    o = s.opts
    return (
        f"# falconrec hardening: {o.config}, {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        + (f"`{command}`\n\n" if command else "")
        + f"{len(s.users)} users (Zipf {o.zipf:g}), {len(s.items)} items; first `load-redis` "
        f"{s.timings['load_redis_s']:.1f} s, server ready {s.timings['ready_s']:.1f} s after start, {o.warmup} "
        f"warm-up requests; {os.cpu_count()} CPUs.\n\n"
    )


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through running()'s cleanup


def main(argv: list[str] | None = None, prog: str = "python -m loadtest.hardening") -> int:
    """The command line (`falconrec hardening ...` and `python -m loadtest.hardening ...` both end here)."""
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv, prog)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run(opts, " ".join([prog, *argv]))
    except KeyboardInterrupt:
        print("[hardening] interrupted; redis-server and the server are stopped", file=sys.stderr)
        return 130
    print(report.markdown)
    return 0
