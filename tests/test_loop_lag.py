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


def test_recent_lateness_reaches_admission_and_shortens_ranking():
    """Issue 26: the loop's recent lateness (90th percentile of the last second's ticks) is reported to admission,
    and ranking plans and times itself that much earlier: its timer fired a median 1.1 ms, p90 3.8 ms late at
    300 req/s, and the answers behind it ran past the budget."""
    from service.pipeline.admission import Admission
    from service.pipeline.deadline import Deadline
    from service.pipeline.rank_plan import RESPONSE_RESERVE_S, RankPlanner
    from service.pipeline.recommender import Recommender

    adm = Admission(max_active=2)
    lag = LoopLag(Metrics(), report=adm.note_lateness)
    for _ in range(95):
        lag.observe(0.0005)
    for _ in range(5):
        lag.observe(0.030)  # a few long stalls move the 90th percentile little
    assert 0.0005 <= adm.lateness_s == lag.recent_s < 0.002
    for _ in range(100):
        lag.observe(0.004)  # the window is the last 100 ticks: the old ones are gone
    assert adm.lateness_s == 0.004

    rec = Recommender.__new__(Recommender)  # the planning arithmetic alone, no models
    rec.admission, rec.planner = adm, RankPlanner(None, microbatch=128)
    rec.planner.cost_s = 10e-6  # 10 us a candidate, 12.5 with the margin

    class Left(Deadline):  # 10 ms left whenever asked: the arithmetic without the clock
        def remaining(self) -> float:
            return 0.010

    left = Left(1.0)  # 4.5 ms for ranking after the 4 ms lateness and the response reserve: 360 candidates
    assert rec._affordable(1000, left) == int((0.010 - RESPONSE_RESERVE_S - 0.004) / 12.5e-6) == 360
    adm.note_lateness(0.0)
    assert rec._affordable(1000, left) == int((0.010 - RESPONSE_RESERVE_S) / 12.5e-6) == 680


def test_recent_lateness_is_numpys_percentile_of_the_last_second():
    """The rolling window (a sorted list moved one tick at a time) gives what np.percentile over the same window
    gives, through the window's filling and its sliding."""
    import numpy as np

    from service.loop_lag import RECENT_QUANTILE, RECENT_TICKS

    rng = np.random.default_rng(7)
    lag = LoopLag(Metrics())
    lags = np.concatenate([rng.exponential(0.002, 250), np.full(30, 0.001), rng.exponential(0.02, 60)]).tolist()
    for i, x in enumerate(lags):
        lag.observe(x)
        window = lags[max(0, i + 1 - RECENT_TICKS) : i + 1]
        assert abs(lag.recent_s - float(np.percentile(window, RECENT_QUANTILE))) < 1e-12
