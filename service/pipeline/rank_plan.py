"""How many candidates ranking can take in what is left of a request's budget (issue 26).

The time m candidates take is planned as start + m x per: with cross-request batching, the batcher's queue ahead and
its learned cost per candidate (CandidateBatcher.backlog); without it, a cost per candidate learned from this
process's rankings. The plan is stretched by a margin that is not a constant but kept where about
TIMEOUT_TARGET of rankings run out of time: a ranking that times out answers in recall order (all of its work lost),
while ranking fewer candidates costs little (the cascade at 200 candidates was within 0.003 HR@10 of 1,000), so the
margin grows at once after a timeout and shrinks slowly while rankings finish. With a fixed 1.25x, 7-27 % of
rankings timed out at 300 req/s on two cores: under load they took a median 1.3x, p90 3.1x their plan (since then
the plan itself is better: CandidateBatcher.backlog).
"""

from __future__ import annotations

import math

from service.pipeline.batching import CandidateBatcher

RESPONSE_RESERVE_S = 0.0015  # top K, the response body and its serialisation, after ranking
MIN_MARGIN, MAX_MARGIN = 1.25, 4.0
TIMEOUT_TARGET = 0.01  # the share of rankings the margin lets time out
GROW = 1.1  # the margin after a timeout: x GROW; after a ranking in time: x SHRINK, so that they balance at the target
SHRINK = math.exp(-math.log(GROW) * TIMEOUT_TARGET / (1 - TIMEOUT_TARGET))


class RankPlanner:
    def __init__(self, batcher: CandidateBatcher | None, microbatch: int):
        self.batcher = batcher
        self.microbatch = microbatch
        self.cost_s = 20e-6  # without the batcher: EWMA of ranking seconds per candidate, learned online
        self.margin = MIN_MARGIN

    def affordable(self, recalled: int, remaining_s: float) -> int:
        """As many of the `recalled` candidates as fit in `remaining_s` less the response's reserve, planned with
        the margin."""
        start_s, per_s = self.batcher.backlog() if self.batcher is not None else (0.0, self.cost_s)
        budget = (remaining_s - RESPONSE_RESERVE_S) / self.margin - start_s
        return min(recalled, max(int(budget / per_s), 0)) if budget > 0 else 0

    def learn(self, m: int, seconds: float, timed_out: bool) -> None:
        """After a ranking of m candidates that took `seconds` (or timed out): the margin, and the unbatched cost."""
        self.margin = min(self.margin * GROW, MAX_MARGIN) if timed_out else max(self.margin * SHRINK, MIN_MARGIN)
        if self.batcher is None and not timed_out:
            # Charged as at least one full microbatch: a call over a few candidates costs about as much as one
            # over b_m (fixed per-call overhead). Dividing by the few would inflate the per-candidate estimate,
            # shrink the next request's m further and lock the service into ranking a handful (seen under load).
            per = seconds / max(m, self.microbatch)
            self.cost_s = 0.8 * self.cost_s + 0.2 * per
