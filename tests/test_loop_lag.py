"""The event-loop lag monitor (service/loop_lag.py): a synchronous step that holds the loop shows as lag."""

from __future__ import annotations

import asyncio
import time

from service.loop_lag import LoopLag
from service.metrics import Metrics


def test_a_blocked_loop_shows_as_lag_in_the_metrics():
    metrics = Metrics()

    async def main() -> LoopLag:
        lag = LoopLag(metrics, interval_s=0.005)
        lag.start()
        await asyncio.sleep(0.05)
        time.sleep(0.08)  # a synchronous step holding the loop: every timer due meanwhile runs late
        await asyncio.sleep(0.05)
        await lag.close()
        return lag

    lag = asyncio.run(main())
    assert lag.longest_s >= 0.07  # a lower bound only: a busy machine makes the lag longer, never shorter
    text = metrics.render().decode()
    assert "falconrec_event_loop_lag_max_seconds" in text
    late = [ln for ln in text.splitlines() if ln.startswith('falconrec_event_loop_lag_seconds_bucket{le="0.05"}')]
    count = [ln for ln in text.splitlines() if ln.startswith("falconrec_event_loop_lag_seconds_count")]
    assert float(count[0].split()[-1]) - float(late[0].split()[-1]) >= 1  # at least one wake-up > 50 ms late
