"""Admission to the pipeline: at most `max_active` requests run it at once, the others wait in arrival order.

Letting all of them in shares the cores among every request, so a burst makes all of them late instead of a few.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from service.errors import Overloaded
from service.pipeline.deadline import Deadline


class Admission:
    def __init__(self, max_active: int):
        self.max_active = max_active
        self._slots = asyncio.Semaphore(max_active)
        self.active = 0  # holding a slot
        self.waiting = 0  # queued for one
        self._hold_s = 5e-3  # EWMA of how long a request holds a slot: what one place in the queue costs

    @property
    def hold_s(self) -> float:
        """How long a request holds a slot (moving average): what one place in the queue costs."""
        return self._hold_s

    def expected_wait(self, not_yet_queued: int = 0) -> float:
        """Seconds until a newcomer gets a slot: the queue ahead drains max_active at a time.

        `not_yet_queued`: requests that arrived before the newcomer and will queue ahead of it but have not
        reached admission yet (the HTTP guard counts them: they are still being parsed and validated).
        """
        ahead = self.active + self.waiting + not_yet_queued
        if ahead < self.max_active:
            return 0.0
        return (ahead - self.max_active + 0.5) * self._hold_s / self.max_active

    def overloaded(self, remaining_s: float, not_yet_queued: int = 0) -> str | None:
        """Why a newcomer with `remaining_s` of budget cannot get a slot in time, or None when it may."""
        ahead = self.waiting + not_yet_queued
        if ahead == 0 or self.expected_wait(not_yet_queued) <= remaining_s:
            return None
        return f"overloaded: {ahead} requests queued ahead cannot finish within the budget"

    @asynccontextmanager
    async def admitted(self, deadline: Deadline, patient: bool = False) -> AsyncIterator[None]:
        """A pipeline slot, in arrival order.

        An interactive request waits at most its budget, and is refused at once when the queue ahead of it
        cannot drain within that budget: waiting it out only to answer 503 (p50 28 ms at 2x load) helped nobody.
        A `patient` one (a batch user over gRPC) waits as long as its caller does, and its budget counts from
        admission: batch work queues behind and among interactive requests instead of failing.
        """
        if self._slots.locked():
            if not patient and self.expected_wait() > deadline.remaining():
                raise Overloaded(
                    f"overloaded: {self.waiting} requests queued ahead cannot finish within the "
                    f"{deadline.budget_s * 1000:g} ms budget"
                )
            self.waiting += 1
            try:
                if patient:
                    await self._slots.acquire()
                else:
                    await asyncio.wait_for(self._slots.acquire(), max(deadline.remaining(), 0.0))
            except TimeoutError as e:
                raise Overloaded(
                    f"overloaded: no pipeline slot within the {deadline.budget_s * 1000:g} ms budget "
                    f"({self.max_active} running, {self.waiting} waiting)"
                ) from e
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        admitted_at = time.perf_counter()
        if patient:
            deadline.start = admitted_at
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
            self._hold_s = 0.9 * self._hold_s + 0.1 * (time.perf_counter() - admitted_at)
