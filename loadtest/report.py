"""Latency report from the exact per-request CSV: summary numbers, a PNG and a markdown file."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Summary:
    requests: int
    duration_s: float
    rate: float
    p50: float
    p95: float
    p99: float
    max: float
    error_rate: float
    degraded_rate: float
    server_p50: float | None = None  # the service's own time (timings_ms), where the CSV has it
    server_p99: float | None = None

    def markdown(self, title: str, budget_ms: float) -> str:
        ok = "PASS" if self.p99 <= budget_ms and self.error_rate <= 0.001 else "FAIL"
        return (
            f"# {title}\n\n| metric | value |\n|---|---|\n"
            f"| requests | {self.requests} |\n| duration | {self.duration_s:.1f} s |\n"
            f"| achieved rate | {self.rate:.1f} req/s |\n| p50 | {self.p50:.2f} ms |\n| p95 | {self.p95:.2f} ms |\n"
            f"| p99 | {self.p99:.2f} ms |\n| max | {self.max:.2f} ms |\n| errors | {100 * self.error_rate:.3f} % |\n"
            f"| degraded | {100 * self.degraded_rate:.2f} % |\n"
            + (
                f"| in the service (p50 / p99) | {self.server_p50:.2f} / {self.server_p99:.2f} ms |\n"
                if self.server_p50 is not None
                else ""
            )
            + "\n"
            f"SLO: p99 <= {budget_ms:g} ms and errors <= 0.1 %: **{ok}**\n"
        )


def load(csv_path: Path, name: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(completion time, latency ms, error, degraded, the service's own ms or NaN where not recorded), for the
    requests called `name` (an endpoint: a mixed run holds reads and writes) or all of them."""
    t, lat, err, deg, server = [], [], [], [], []
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            if name is not None and row["name"] != name:
                continue
            t.append(float(row["t"]))
            lat.append(float(row["latency_ms"]))
            err.append(row["status"] != "200" or bool(row["error"]))
            deg.append(row["degraded"] == "1")
            server.append(float(row["server_ms"]) if row.get("server_ms") else np.nan)
    return np.array(t), np.array(lat), np.array(err, bool), np.array(deg, bool), np.array(server)


def summarize(csv_path: Path, name: str | None = None) -> Summary:
    t, lat, err, deg, server = load(csv_path, name)
    if len(lat) == 0:
        raise RuntimeError(f"{csv_path} holds no requests: did the server answer at all?")
    dur = max(float(t.max() - t.min()), 1e-9)
    p = np.percentile(lat, [50, 95, 99])
    server = server[~np.isnan(server)]
    sp = np.percentile(server, [50, 99]) if len(server) else (None, None)
    return Summary(
        len(lat),
        dur,
        len(lat) / dur,
        *map(float, p),
        float(lat.max()),
        float(err.mean()),
        float(deg.mean()),
        *(None if v is None else float(v) for v in sp),
    )


def plot(csv_path: Path, png: Path, budget_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, lat, *_ = load(csv_path)
    t = t - t.min()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.hist(lat, bins=100, color="#4477aa")
    a.axvline(budget_ms, color="red", ls="--", label=f"budget {budget_ms:g} ms")
    a.set_xlabel("latency (ms)")
    a.set_ylabel("requests")
    a.set_title("latency histogram")
    a.legend()
    edges = np.arange(0, t.max() + 1, max(1.0, t.max() / 60))
    mids, rows = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = lat[(t >= lo) & (t < hi)]
        if len(sel):
            mids.append((lo + hi) / 2)
            rows.append(np.percentile(sel, [50, 95, 99]))
    if rows:
        r = np.array(rows)
        for i, name in enumerate(("p50", "p95", "p99")):
            b.plot(mids, r[:, i], label=name)
    b.axhline(budget_ms, color="red", ls="--")
    b.set_xlabel("time (s)")
    b.set_ylabel("latency (ms)")
    b.set_title("percentiles over time")
    b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
