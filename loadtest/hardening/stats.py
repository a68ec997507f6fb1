"""Counting answers and writing them down: per-phase statistics of the recommend stream, the markdown helpers every
part's section uses, and what the server's log said."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.hardening.traffic import Answer
from loadtest.procs import pct


def numbers_out(text: str) -> str:
    """N for every number, so that the same reason adds up ("3 requests queued ahead" -> "N requests ...")."""
    return re.sub(r"\d+(\.\d+)?", "N", text)


@dataclass
class PhaseStats:
    """Answers of one phase, counted and summarised."""

    phase: str
    seconds: float
    n: int = 0
    ok: int = 0
    degraded: int = 0
    store_degraded: int = 0
    not_found: int = 0
    unavailable: int = 0
    no_retry_after: int = 0
    other: Counter = field(default_factory=Counter)
    client_errors: Counter = field(default_factory=Counter)
    p50_200: float | None = None
    p99_200: float | None = None
    p50_503: float | None = None
    p99_503: float | None = None
    server_p99: float | None = None
    lag_p99: float | None = None
    details: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, phase: str, seconds: float, answers: list[Answer]) -> PhaseStats:
        mine = [a for a in answers if a.phase == phase]
        st = cls(phase, seconds, n=len(mine))
        for a in mine:
            st._count(a)
        lat200 = [a.latency_ms for a in mine if a.status == 200]
        lat503 = [a.latency_ms for a in mine if a.status == 503]
        st.p50_200, st.p99_200 = pct(lat200, 50), pct(lat200, 99)
        st.p50_503, st.p99_503 = pct(lat503, 50), pct(lat503, 99)
        st.server_p99 = pct([a.server_ms for a in mine if a.server_ms is not None], 99)
        st.lag_p99 = pct([a.lag_ms for a in mine], 99)
        return st

    def _count(self, a: Answer) -> None:
        if a.status == 200:
            self.degraded += a.degraded
            self.store_degraded += a.store_degraded
            self.ok += not a.degraded
        elif a.status == 404:
            self.not_found += 1
        elif a.status == 503:
            self.unavailable += 1
            self.no_retry_after += not a.retry_after
        elif a.status == 0:
            self.client_errors[a.detail] += 1
        else:
            self.other[a.status] += 1
        if a.status not in (0, 200):
            self.details[f"{a.status} {numbers_out(a.detail)}"] += 1
        for r in a.reasons:
            self.details["200 degraded: " + numbers_out(r)] += 1

    @property
    def served(self) -> int:
        """Answered 200, degraded or not."""
        return self.ok + self.degraded

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k in ("other", "client_errors", "details"):
            d[k] = {str(key): v for key, v in d[k].items()}
        return d


# --- markdown -----------------------------------------------------------------------------------------------------
def fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def share(part: int, n: int) -> str:
    return f"{part} ({100 * part / n:.1f} %)" if n else "0"


def counts(c: Counter | dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "0"


def spread(values: Sequence[float], digits: int = 2) -> str:
    """min / p50 / max, or – when there are none."""
    if not values:
        return "–"
    return f"{fmt(min(values), digits)} / {fmt(pct(values, 50), digits)} / {fmt(max(values), digits)}"


def table(rows: list[tuple[str, str]]) -> str:
    """A two-column markdown table."""
    return "| | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows) + "\n"


PHASE_HEADER = (
    "| phase | s | requests | 200 | 200 degraded (by the store) | 404 | 503 | 503 w/o Retry-After | other "
    "| client errors | 200 p50 / p99 ms | 503 p50 / p99 ms | server p99 ms | client lag p99 ms |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def phase_row(st: PhaseStats) -> str:
    return (
        f"| {st.phase} | {st.seconds:.1f} | {st.n} | {share(st.ok, st.n)} "
        f"| {share(st.degraded, st.n)}, store {st.store_degraded} "
        f"| {share(st.not_found, st.n)} | {share(st.unavailable, st.n)} | {st.no_retry_after} "
        f"| {counts(st.other)} | {counts(st.client_errors)} | {fmt(st.p50_200)} / {fmt(st.p99_200)} "
        f"| {fmt(st.p50_503)} / {fmt(st.p99_503)} | {fmt(st.server_p99)} | {fmt(st.lag_p99)} |\n"
    )


def phase_table(stats: list[PhaseStats]) -> str:
    return PHASE_HEADER + "".join(phase_row(st) for st in stats) + "\n" + details_lines(stats)


def details_lines(stats: list[PhaseStats]) -> str:
    lines = ""
    for st in stats:
        for text, n in st.details.most_common(6):
            lines += f"- {st.phase}: {n} × `{text}`\n"
    return lines


def server_log_findings(log: Path) -> Counter:
    """Tracebacks and error/warning lines in the server's output."""
    found: Counter = Counter()
    if not log.exists():
        return found
    for line in log.read_text(errors="replace").splitlines():
        if "Traceback" in line:
            found["Traceback"] += 1
        elif " ERROR " in line or line.startswith("ERROR"):
            found["ERROR: " + line.split("ERROR", 1)[1].strip()[:100]] += 1
        elif " WARNING " in line or line.startswith("WARNING"):
            found["WARNING: " + line.split("WARNING", 1)[1].strip()[:100]] += 1
    return found
