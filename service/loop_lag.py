"""How late the event loop runs what is due (issue 22: no write may stall it for more than a few ms).

A task sleeps `interval_s` again and again and records how much later than asked it woke up: while a synchronous
step holds the loop (a catalog add, a JSON encode, a model call that forgot its thread), every timer and every
socket waits that long. Prometheus: `falconrec_event_loop_lag_seconds` (histogram) and
`falconrec_event_loop_lag_max_seconds` (the longest since start). A CPU shared with other processes shows here too:
a lag is a stall of this process, whatever its cause. Costs ~100 wake-ups a second: ~1.3 % of a core on an idle
2-core VM, about what a bare `asyncio.sleep(0.01)` loop costs there (the timer's wake-up, not Python).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import deque
from collections.abc import Callable

from service.metrics import Metrics

INTERVAL_S = 0.01
RECENT_TICKS = 100  # the window of `recent_s`: the last second at INTERVAL_S
RECENT_QUANTILE = 90


class LoopLag:
    """`report`, when given, is told after every tick how late the loop's timers have run lately (`recent_s`):
    the pipeline's own timers (a ranking's deadline) fire that late too, so it stops them that much earlier."""

    def __init__(self, metrics: Metrics, interval_s: float = INTERVAL_S, report: Callable[[float], None] | None = None):
        self.metrics = metrics
        self.interval_s = interval_s
        self.report = report
        self.longest_s = 0.0
        self.recent_s = 0.0  # RECENT_QUANTILE of the last RECENT_TICKS lags
        self._recent: deque[float] = deque()  # the last RECENT_TICKS lags, oldest first
        self._sorted: list[float] = []  # the same, sorted: the quantile is one index
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - due)
            self.observe(lag)

    def observe(self, lag: float) -> None:
        self.metrics.loop_lag.observe(lag)
        if lag > self.longest_s:
            self.longest_s = lag
            self.metrics.loop_lag_max.set(lag)
        self._remember(lag)
        if self.report is not None:
            self.report(self.recent_s)

    def _remember(self, lag: float) -> None:
        """The window moves by one tick: ~2 us. np.percentile over the window cost ~320 us a tick on an idle
        2-core VM (cold caches at 100 calls a second: 3.2 % of a core, more than the ticks themselves)."""
        if len(self._recent) == RECENT_TICKS:
            del self._sorted[bisect.bisect_left(self._sorted, self._recent.popleft())]
        self._recent.append(lag)
        bisect.insort(self._sorted, lag)
        # numpy's default (linear) percentile: between the two order statistics around the quantile's position
        pos = (len(self._sorted) - 1) * RECENT_QUANTILE / 100
        lo = int(pos)
        hi = min(lo + 1, len(self._sorted) - 1)
        self.recent_s = self._sorted[lo] + (self._sorted[hi] - self._sorted[lo]) * (pos - lo)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
