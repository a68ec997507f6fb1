"""A request's time budget. Each stage asks what is left; nothing waits past it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Deadline:
    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def ms(cls, budget_ms: float) -> Deadline:
        return cls(budget_ms / 1000.0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def less(self, seconds: float) -> Deadline:
        """The same start with `seconds` less budget: for a stage that must leave time for what follows it."""
        return Deadline(self.budget_s - seconds, self.start)


class StageTimer:
    """Per-stage wall times (ms) for Server-Timing, the response body and the histograms."""

    def __init__(self, start: float | None = None) -> None:
        self.stages: dict[str, float] = {}
        self._t = time.perf_counter() if start is None else start

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + (now - self._t) * 1000.0
        self._t = now

    def server_timing(self) -> str:
        return ", ".join(f"{k};dur={v:.2f}" for k, v in self.stages.items())
