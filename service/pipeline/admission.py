"""Admission to the pipeline: at most `max_active` requests run it at once, the others wait in arrival order.

Letting all of them in shares the cores among every request, so a burst makes all of them late instead of a few.

A request is let in only when it can still be answered within its budget (issue 26): the queue ahead of it must
drain, and then the shortest useful answer (history, user tower, recall, top k; ranking is cut to what is left) must
fit. That shortest answer's cost is learned from the requests served (`note_base`). What cannot finish is refused
at once instead of being started and answered late; what was let in is answered, with the shortest answer when the
queue drained slower than expected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.errors import Overloaded
from service.pipeline.deadline import Deadline

BASE_MARGIN = 1.5  # the learned base cost is a mean: leave room for a slower one
BASE_DEFAULT_S = 2e-3


class Admission:
    def __init__(self, max_active: int):
        self.max_active = max_active
        self._slots = asyncio.Semaphore(max_active)
        self.active = 0  # holding a slot
        self.waiting = 0  # queued for one
        self._hold_s = 5e-3  # EWMA of how long a request holds a slot: what one place in the queue costs
        self._base_s = BASE_DEFAULT_S  # EWMA: the shortest useful answer's time in the pipeline (recall order)
        self.lateness_s = 0.0  # how late the event loop's timers run lately (service/loop_lag.py reports it)

    @property
    def hold_s(self) -> float:
        """How long a request holds a slot (moving average): what one place in the queue costs."""
        return self._hold_s

    @property
    def base_s(self) -> float:
        """What the shortest useful answer needs once admitted, with a margin (see BASE_MARGIN)."""
        return BASE_MARGIN * self._base_s

    def reset_base(self) -> None:
        """Forget what warm-up taught: cold first runs (~40 ms) say nothing about the served ones."""
        self._base_s = BASE_DEFAULT_S

    def note_base(self, seconds: float) -> None:
        """A served request's time in the stages every answer needs (history, user tower, recall, top k)."""
        self._base_s = 0.9 * self._base_s + 0.1 * seconds

    def note_lateness(self, seconds: float) -> None:
        """A timer set for t fires at about t + this (a busy loop, a busy machine): every wait that must end by a
        deadline is set this much earlier. Measured at 300 req/s, 2 cores: ranking timeouts fired a median 1.1 ms,
        p90 3.8 ms late, and the answers behind them ran past the budget."""
        self.lateness_s = seconds

    def expected_wait(self, not_yet_queued: int = 0) -> float:
        """Seconds until a newcomer gets a slot: the queue ahead drains max_active at a time.

        `not_yet_queued`: requests that arrived before the newcomer and will queue ahead of it but have not
        reached admission yet (the HTTP guard counts them: they are still being parsed and validated).
        """
        ahead = self.active + self.waiting + not_yet_queued
        if ahead < self.max_active:
            return 0.0
        return (ahead - self.max_active + 0.5) * self._hold_s / self.max_active

    def overloaded(self, remaining_s: float, not_yet_queued: int = 0, answer: bool = True) -> str | None:
        """Why a newcomer with `remaining_s` of budget cannot get a slot in time (`answer`: with room for the shortest
        useful answer, as `admitted` leaves for a recommendation), or None when it may."""
        ahead = self.waiting + not_yet_queued
        base = self.base_s if answer else 0.0
        if ahead == 0 or self.expected_wait(not_yet_queued) + base <= remaining_s:
            return None
        return f"overloaded: {ahead} requests queued ahead cannot finish within the budget{self._room(base)}"

    def _room(self, base: float) -> str:
        return f" and leave the {base * 1000:.1f} ms an answer needs" if base else ""

    @asynccontextmanager
    async def admitted(self, deadline: Deadline, patient: bool = False, answer: bool = False) -> AsyncIterator[bool]:
        """A pipeline slot, in arrival order: yields True holding one.

        An interactive request waits at most its budget, and is refused at once when the queue ahead of it
        cannot drain within that budget: waiting it out only to answer 503 (p50 28 ms at 2x load) helped nobody.
        A `patient` one (a batch user over gRPC) waits as long as its caller does, and its budget counts from
        admission: batch work queues behind and among interactive requests instead of failing.
        `answer`: the request can degrade to the shortest useful answer (a recommendation); it is refused when not
        even that fits in what is left of its budget, before it waits. Once let into the queue it is answered:
        when no slot frees in time (the queue drained slower than expected) it yields False, holding no slot, and
        the caller gives the shortest answer, so a refusal comes on arrival or not at all (those late 503s took
        10-20 ms of server time, most of the budget, for nothing).
        """
        if not await self._take_slot(deadline, patient, answer):
            yield False
            return
        admitted_at = time.perf_counter()
        if patient:
            deadline.start = admitted_at
        self.active += 1
        try:
            yield True
        finally:
            self.active -= 1
            self._slots.release()
            self._hold_s = 0.9 * self._hold_s + 0.1 * (time.perf_counter() - admitted_at)

    async def _take_slot(self, deadline: Deadline, patient: bool, answer: bool) -> bool:
        """True with a slot taken; False when an `answer` request got none in time (it answers without one)."""
        if not self._slots.locked():
            await self._slots.acquire()
            return True
        base = self.base_s if answer else 0.0
        if not patient and self.expected_wait() + base > deadline.remaining():
            raise Overloaded(
                f"overloaded: {self.waiting} requests queued ahead cannot finish within the "
                f"{deadline.budget_s * 1000:g} ms budget{self._room(base)}"
            )
        self.waiting += 1
        try:
            if patient:
                await self._slots.acquire()
            else:
                # No longer than leaves room for the shortest answer: a slot later than that is useless.
                wait = deadline.remaining() - base - self.lateness_s
                await asyncio.wait_for(self._slots.acquire(), max(wait, 0.0))
            return True
        except TimeoutError as e:
            if answer:
                return False
            raise Overloaded(
                f"overloaded: no pipeline slot within the {deadline.budget_s * 1000:g} ms budget "
                f"({self.max_active} running, {self.waiting} waiting)"
            ) from e
        finally:
            self.waiting -= 1
