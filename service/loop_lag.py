"""How late the event loop runs what is due (issue 22: no write may stall it for more than a few ms).

A task sleeps `interval_s` again and again and records how much later than asked it woke up: while a synchronous
step holds the loop (a catalog add, a JSON encode, a model call that forgot its thread), every timer and every
socket waits that long. Prometheus: `falconrec_event_loop_lag_seconds` (histogram) and
`falconrec_event_loop_lag_max_seconds` (the longest since start). A CPU shared with other processes shows here too:
a lag is a stall of this process, whatever its cause. Costs ~100 wake-ups a second (~0.3 % of a core).
"""

from __future__ import annotations

import asyncio
import contextlib

from service.metrics import Metrics

INTERVAL_S = 0.01


class LoopLag:
    def __init__(self, metrics: Metrics, interval_s: float = INTERVAL_S):
        self.metrics = metrics
        self.interval_s = interval_s
        self.longest_s = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - due)
            self.metrics.loop_lag.observe(lag)
            if lag > self.longest_s:
                self.longest_s = lag
                self.metrics.loop_lag_max.set(lag)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
