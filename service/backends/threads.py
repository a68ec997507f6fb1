"""Inference threads with a lighter hand-off than `loop.run_in_executor`.

run_in_executor makes a concurrent.futures.Future (a Condition inside), a work item, chains the two futures with
callbacks and checks the pool's size on every call. Two calls there and back cost 97-132 us of CPU on a 2-core
EPYC, 54-71 us here (docs/performance.md); most of it on the event loop's thread, which every request needs.
Here a call is one tuple on a SimpleQueue, and its result goes back with one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any


def _deliver(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if not fut.done():  # cancelled meanwhile (its caller timed out): the result is not wanted
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class WorkerThreads:
    """`n` threads taking calls off one FIFO queue. A call whose future was cancelled before a thread took it
    (its caller timed out) is skipped, as ThreadPoolExecutor skips a cancelled work item."""

    def __init__(self, n: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """fn(*args) on a worker thread; await the returned future on the calling event loop."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return fut

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            fn, args, loop, fut = call
            if fut.cancelled():  # read off the loop's thread: at worst a call just cancelled still runs
                continue
            try:
                value, ok = fn(*args), True
            except BaseException as e:  # noqa: BLE001 - handed to the caller, as an executor does
                value, ok = e, False
            with contextlib.suppress(RuntimeError):  # the loop closed while this ran: nobody waits for it
                loop.call_soon_threadsafe(_deliver, fut, ok, value)

    def shutdown(self) -> None:
        """Calls not started are cancelled; running ones finish; the threads then exit (not joined)."""
        while True:
            try:
                call = self._queue.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                call[3].cancel()  # close() runs on the event loop, as every submit does
        for _ in self._threads:
            self._queue.put(None)
