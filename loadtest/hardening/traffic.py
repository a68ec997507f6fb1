"""What the harness sends: the open-loop stream of POST /v1/recommend that runs beside every attack, and the item
writes and servability checks of the parts that add items."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx
import numpy as np

from loadtest.hardening.stack import Stack


@dataclass
class Answer:
    """One POST /v1/recommend as the client saw it (status 0: no HTTP answer)."""

    phase: str
    t: float  # intended arrival, on the event loop's clock
    lag_ms: float  # how late the client sent it
    status: int
    latency_ms: float  # from the intended arrival (queueing in the client counts)
    degraded: bool = False
    server_ms: float | None = None
    retry_after: bool = False
    detail: str = ""
    reasons: tuple[str, ...] = ()  # degraded_reasons of a 200

    @property
    def store_degraded(self) -> bool:
        """Degraded because of the store (not the budget): the outage's own kind of answer."""
        return any("store" in r or "redis" in r.lower() for r in self.reasons)


class Stream:
    """Open-loop Poisson arrivals of POST /v1/recommend; each request is its own task (arrivals never wait for
    answers, so a slow server shows as latency and errors, not as a lower send rate)."""

    def __init__(self, stack: Stack, rate: float, seed: int, connections: int = 32):
        self.s = stack
        self.rate = rate
        self.rng = np.random.default_rng(seed)
        self.connections = connections
        self.answers: list[Answer] = []

    async def run(self, phase: Callable[[], str], stop: asyncio.Event, max_s: float) -> list[Answer]:
        """Send until `stop` is set or `max_s` have passed; each answer is labelled with `phase()` at its arrival."""
        limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
        timeout = httpx.Timeout(self.s.opts.request_timeout_s)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        async with httpx.AsyncClient(base_url=self.s.http_url, limits=limits, timeout=timeout) as client:
            with contextlib.suppress(httpx.HTTPError):  # the client's first request imports and connects: not timed
                await client.get("/healthz")
            t0 = loop.time()
            due = t0
            while not stop.is_set() and due - t0 < max_s:
                due += float(self.rng.exponential(1.0 / self.rate))
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if stop.is_set():
                    break
                uid = int(self.rng.choice(self.s.users, p=self.s.weights))
                task = asyncio.create_task(self._one(client, phase(), due, uid))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=self.s.opts.request_timeout_s + 5)
        return self.answers

    async def _one(self, client: httpx.AsyncClient, phase: str, due: float, uid: int) -> None:
        loop = asyncio.get_running_loop()
        lag = (loop.time() - due) * 1000
        try:
            r = await client.post("/v1/recommend", json={"user_id": uid, "k": self.s.opts.k})
        except httpx.HTTPError as e:
            self.answers.append(Answer(phase, due, lag, 0, (loop.time() - due) * 1000, detail=type(e).__name__))
            return
        self.answers.append(self._answer(r, phase, due, lag, (loop.time() - due) * 1000))

    @staticmethod
    def _answer(r: httpx.Response, phase: str, due: float, lag: float, ms: float) -> Answer:
        a = Answer(phase, due, lag, r.status_code, ms, retry_after="retry-after" in r.headers)
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 200:
            a.degraded = bool(body.get("degraded"))
            a.server_ms = float(sum(body.get("timings_ms", {}).values()))
            a.reasons = tuple(str(x)[:120] for x in body.get("degraded_reasons") or ())
        else:
            a.detail = str(body.get("detail", r.text) if isinstance(body, dict) else r.text)[:120]
        return a


# --- items --------------------------------------------------------------------------------------------------------
def item_text(item_id: int) -> str:
    return f"Harness Item {item_id} (2001) | Drama"


async def post_items(c: httpx.AsyncClient, s: Stack, ids: Iterable[int]) -> httpx.Response:
    """One POST /v1/items (202 when accepted; the worker embeds them afterwards)."""
    items = [{"item_id": int(i), "text": item_text(int(i))} for i in ids]
    return await c.post("/v1/items", json={"items": items}, headers=s.auth)


async def servable(c: httpx.AsyncClient, item_id: int) -> bool:
    """Whether this replica can score the item: what the tests check (/v1/score answers 200 only for known items)."""
    body = {"history": [{"item_id": item_id, "ts": 1}], "item_ids": [item_id]}
    with contextlib.suppress(httpx.HTTPError):
        return (await c.post("/v1/score", json=body)).status_code == 200
    return False


async def wait_servable(c: httpx.AsyncClient, ids: Iterable[int], timeout_s: float, step_s: float = 0.1) -> set[int]:
    """Poll until every id is servable or `timeout_s` passes; returns those still not servable. One check at a time:
    the polling must not itself load the server that a probe is watching."""
    waiting = set(ids)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while waiting and loop.time() < end:
        waiting = {i for i in sorted(waiting) if not await servable(c, i)}
        if waiting:
            await asyncio.sleep(step_s)
    return waiting
