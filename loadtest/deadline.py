"""Does the server keep its budget under load? (issue 26): a real `falconrec serve`, the open-loop generator
(loadtest/openloop.py: ~0.1 core, latency from each request's scheduled time) at several rates, one after another.

Prints, per rate: achieved rate, client p50/p99 of the 200s, the service's own p99 (the sum of Server-Timing stages),
degraded share, 503 share, 503 client p50 and the 503s' server time (Server-Timing total), the server process's CPU
time per request at that rate (all its threads and worker processes, from /proc: HTTP, the pipeline and the models),
the share of its event-loop ticks that ran late, the machine's CPU steal (a VM's cores given to others) and how far
the generator's own sends fell behind their schedule (a client latency includes that), beside
the machine's single-thread GEMM peak measured in the same run; then where the late answers spent their time, why
answers were degraded and why requests were refused. The budget is the server's (FALCONREC_BUDGET_MS, 20 ms).
Before the first rate every user is asked once (100 req/s): the rows measure a warm server, not its first seconds.
Beside each rate, Locust at the same rate right after (`--locust-seconds`, 0: none), over the same users with a Zipf
skew: its numbers include its own CPU on the server's two cores (gevent, a third of a core or more at 300 req/s).

    falconrec deadline --config ml1m --rates 100,150,200,250,300 --seconds 60
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

from loadtest.bench import cpu_summary, gemm_peak_gflops
from loadtest.openloop import Sample, build_requests, run
from loadtest.procs import pct, start_serve, stop_group
from loadtest.report import summarize
from loadtest.run import run_locust
from service.artifacts import ArtifactPaths
from service.settings import Settings

WARM_RATE = 100.0  # req/s of the warm-up pass over every user
ACTIVE_USERS = 2000  # the users asked: the most active ones (the longest histories), as returning users
LOCUST_USERS = 20  # Locust's concurrency (`falconrec loadtest`'s default): each a Poisson source at rate / users
LATE_MS = 2.0  # the allowed overshoot: an answer later than budget + this is late


def start(config: str, artifacts: Path, repo: Path, log: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if k != "FALCONREC_VERSIONS_DIR"}  # serve exactly this build
    return start_serve(["--config", config, "--artifacts", str(artifacts), "--repo", str(repo)], env, log)


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds so far of every process in a process group, all their threads (Linux /proc; NaN
    where there is none): the server and, with FALCONREC_WORKERS > 1, its worker processes (start_serve gives the
    server a group of its own). A process that exited takes its time with it, so read it while the server runs."""
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid:  # stat field 5: pgrp
            total += int(fields[11]) + int(fields[12])  # fields 14, 15: utime, stime
            found = True
    return total / os.sysconf("SC_CLK_TCK") if found else float("nan")


LAG_METRIC = "falconrec_event_loop_lag_seconds"
LAG_OVER_S = (0.005, 0.02)  # the loop-lag column: share of the server's 10 ms ticks later than these


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far by kind, all cores (/proc/stat's first line: user nice system idle iowait irq
    softirq steal ...; empty where there is none)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return []


def steal_cell(before: list[int], after: list[int]) -> str:
    """The share of the machine's CPU time the hypervisor gave to others during one rate's run (steal): a virtual
    machine of our kind lost 35 % of its cores this way in one spell, and with them the service's p99."""
    if len(before) < 8 or len(after) < 8:
        return "-"
    total = sum(after) - sum(before)
    return f"{100 * (after[7] - before[7]) / total:.0f} %" if total > 0 else "-"


def loop_lag_counts(url: str) -> dict[str, float]:
    """The server's event-loop lag histogram (service/loop_lag.py) as Prometheus exposes it: le -> cumulative count."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(rf'^{LAG_METRIC}_bucket{{le="([^"]+)"}} (\S+)$', text, re.MULTILINE)
    return {le: float(n) for le, n in found}


def lag_cell(before: dict[str, float], after: dict[str, float]) -> str:
    """Share of the loop's ticks in one rate's run that ran more than each LAG_OVER_S late: a stall of the whole
    process (a synchronous step, the GIL, the machine's other tenants) delays every request, before its arrival
    is even stamped (the gap between the client's latency and the service's own)."""
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    if total <= 0:
        return "-"
    shares = []
    for over in LAG_OVER_S:
        le = repr(over)
        within = after.get(le, 0.0) - before.get(le, 0.0)
        shares.append(f"{100 * (total - within) / total:.1f} %")
    return " / ".join(shares)


def row(
    rate: float,
    seconds: float,
    samples: list[Sample],
    cpu_s: float,
    lag: str = "-",
    steal: str = "-",
    behind_s: float | None = None,
) -> str:
    """One rate's cells; `behind_s`: how far the generator's sends fell behind their schedule at most (its own lag,
    which a client latency includes: on two cores a saturated server starves the generator too)."""
    ok = [s for s in samples if s.status == 200]
    shed = [s for s in samples if s.status == 503]
    lat = [s.latency_ms for s in ok]
    srv = [s.server_ms for s in ok if s.server_ms == s.server_ms]
    n = max(len(samples), 1)
    deg = sum(s.degraded for s in ok) / max(len(ok), 1)
    # Of those, the answers in recall order (ranking skipped, timed out, no slot): the ones that lost the ranker.
    unranked = sum(any("recall order" in r for r in s.reasons) for s in ok) / max(len(ok), 1)
    shed_srv = [s.stages["total"] for s in shed if "total" in s.stages]
    cells = [
        f"{rate:g}",
        f"{len(samples) / seconds:.0f}",
        f"{pct(lat, 50, 1)} / {pct(lat, 99, 1)}",
        f"{pct(srv, 99, 1)}",
        f"{100 * deg:.1f} % ({100 * unranked:.1f} %)",
        f"{100 * len(shed) / n:.1f} %",
        f"{pct([s.latency_ms for s in shed], 50, 1)} / {pct(shed_srv, 50, 2)}",
        f"{sum(s.status not in (200, 503) for s in samples)}",
        f"{1000 * cpu_s / n:.2f}",
        lag,
        steal,
        "-" if behind_s is None else f"{1000 * behind_s:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def locust_row(url: str, data: Path, rate: float, seconds: float, out: Path) -> str:
    """Locust at `rate` for `seconds` against the same server: achieved rate, p50 / p99 of every answer, the service's
    p99, degraded and non-200 shares (its exact latencies in out/locust-RATE.csv)."""
    csv_path = out / f"locust-{rate:g}.csv"
    run_locust(
        url,
        data,
        rate,
        round(seconds),
        LOCUST_USERS,
        csv_path,
        k=10,
        num_candidates=None,
        request_budget_ms=None,
        active_users=ACTIVE_USERS,
    )
    s = summarize(csv_path)
    srv = "-" if s.server_p99 is None else f"{s.server_p99:.1f}"
    cells = [f"{rate:g}", f"{s.rate:.0f}", f"{s.p50:.1f} / {s.p99:.1f}", srv, f"{100 * s.degraded_rate:.1f} %"]
    return "| " + " | ".join([*cells, f"{100 * s.error_rate:.1f} %"]) + " |"


def late_stages(rate: float, samples: list[Sample], budget_ms: float) -> str:
    """Where the answers over budget + LATE_MS spent their time: each stage's median among them beside its median
    among all answers, so the stage that overshoots stands out (issue 26: is it the queue, the ranking wait, or
    what runs after the ranking's deadline?)."""
    ok = [s for s in samples if s.status == 200 and s.server_ms == s.server_ms]
    late = [s for s in ok if s.server_ms > budget_ms + LATE_MS]
    names = list(dict.fromkeys(k for s in ok for k in s.stages))

    def med(group: list[Sample], k: str) -> str:
        v = pct([s.stages.get(k, 0.0) for s in group], 50)
        return "-" if v is None else f"{v:.2f}"

    cells = ", ".join(f"{k} {med(late, k)} ({med(ok, k)})" for k in names)
    return f"| {rate:g} | {len(late)} of {len(ok)} | {cells} |"


def reason_kinds(rate: float, samples: list[Sample], top: int = 3, status: int = 200) -> str:
    """The commonest kinds of degradation among the answers (numbers masked: "budget: ranked N of N candidates"),
    each as a share of all answers: which lever the degraded share asks for (issue 26). With `status` 503: the
    refusals' reasons, each as a share of the refusals, with its median server time (shed on arrival, or after a
    wait in the queue?)."""
    group = [s for s in samples if s.status == status]
    kinds = Counter(_mask(r) for s in group for r in s.reasons)
    cells = []
    for k, n in kinds.most_common(top):
        cell = f"{k}: {100 * n / max(len(group), 1):.1f} %"
        if status != 200:
            same = [s.stages.get("total", float("nan")) for s in group if any(_mask(r) == k for r in s.reasons)]
            cell += f" (server p50 {pct(same, 50, 1)} ms)"
        elif "N" in k:  # the numbers' medians: how many candidates "ranked N of N" kept, say
            values = [_numbers(r) for s in group for r in s.reasons if _mask(r) == k]
            cell += f" (median {' / '.join(f'{np.median(col):g}' for col in zip(*values, strict=True))})"
        cells.append(cell)
    return f"| {rate:g} | {'; '.join(cells) or '-'} |"


NUMBER = r"\d+(\.\d+)?"


def _mask(reason: str) -> str:
    """A reason with its numbers as N: reasons of one kind compare equal."""
    return re.sub(NUMBER, "N", reason)


def _numbers(reason: str) -> list[float]:
    return [float(m.group()) for m in re.finditer(NUMBER, reason)]


def main(
    config: str, artifacts: Path, repo: Path, rates: list[float], seconds: float, out: Path, locust_seconds: float = 0.0
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    peak = gemm_peak_gflops()
    budget_ms = Settings().budget_ms  # the server's (FALCONREC_BUDGET_MS), as start() passes the environment on
    data = ArtifactPaths.for_config(config, artifacts).data
    z = np.load(data)
    users = [int(u) for u in z["user_raw_ids"][np.argsort(-z["lengths"], kind="stable")][:ACTIVE_USERS]]
    proc, url = start(config, artifacts, repo, out / "server.log")
    lines = [
        f"## The budget under load: {config}, open loop, {seconds:g} s a rate, GEMM peak {peak:.1f} GFLOP/s",
        "",
        f"CPU: {cpu_summary()}",
        "",
        "| target req/s | achieved | client p50 / p99 ms (200) | service p99 ms | degraded (in recall order) | 503 "
        "| 503 client p50 / server p50 ms | other | server CPU ms / request "
        f"| loop ticks late > {' / '.join(f'{1000 * o:g}' for o in LAG_OVER_S)} ms | CPU steal "
        "| generator behind, max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    late, kinds, refusals, beside = [], [], [], []
    try:
        reqs = build_requests(url, users, 10, None)
        # Warm: every user once at a rate the server holds, so the rates below measure the steady state (each user's
        # history K/V and vector cached, as for returning users), not the first seconds' cold caches.
        asyncio.run(run(url, WARM_RATE, len(reqs) / WARM_RATE, reqs))
        for rate in rates:
            cpu, lag, ticks = group_cpu_s(proc.pid), loop_lag_counts(url), cpu_ticks()
            samples, behind = asyncio.run(run(url, rate, seconds, reqs))
            steal = steal_cell(ticks, cpu_ticks())
            cpu = group_cpu_s(proc.pid) - cpu
            lines.append(row(rate, seconds, samples, cpu, lag_cell(lag, loop_lag_counts(url)), steal, behind))
            late.append(late_stages(rate, samples, budget_ms))
            kinds.append(reason_kinds(rate, samples))
            refusals.append(reason_kinds(rate, samples, status=503))
            print(lines[-1], flush=True)
            if locust_seconds > 0:
                beside.append(locust_row(url, data, rate, locust_seconds, out))
                print(f"Locust: {beside[-1]}", flush=True)
    finally:
        stop_group(proc)
    text = "\n".join(lines + _tail(budget_ms, late, kinds, refusals, beside, locust_seconds))
    (out / "deadline.md").write_text(text + "\n")
    print(text)
    return 0


def _tail(
    budget_ms: float, late: list[str], kinds: list[str], refusals: list[str], beside: list[str], locust_s: float
) -> list[str]:
    """The tables after the main one: Locust beside (where it ran), late answers, degraded and refused ones."""
    locust = [
        "",
        f"Locust beside (right after each rate, {locust_s:g} s, {LOCUST_USERS} users, Zipf over the same users; its "
        "own CPU shares the server's cores)",
        "",
        "| target req/s | achieved | p50 / p99 ms (all answers) | service p99 ms | degraded | non-200 |",
        "|---|---|---|---|---|---|",
        *beside,
    ]
    return [
        *(locust if beside else []),
        "",
        f"Answers over the budget + {LATE_MS:g} ms ({budget_ms:g} + {LATE_MS:g}): each stage's median among them "
        "(among all answers)",
        "",
        "| rate | late | stages, ms |",
        "|---|---|---|",
        *late,
        "",
        "Why answers were degraded (the commonest reasons, each as a share of all answers)",
        "",
        "| rate | reasons |",
        "|---|---|",
        *kinds,
        "",
        "Why requests were refused (503: the commonest reasons, each as a share of the 503s, and their server time)",
        "",
        "| rate | reasons |",
        "|---|---|",
        *refusals,
    ]
