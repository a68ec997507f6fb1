"""The inference threads' hand-off (service/backends/threads.py): results and errors reach the caller, a call
cancelled before a thread took it never runs, and shutdown cancels what is still queued."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.backends.threads import WorkerThreads


def test_results_errors_and_the_thread_they_ran_on():
    async def go():
        w = WorkerThreads(2, "t")
        try:
            assert await w.submit(lambda a, b: a + b, 2, 3) == 5
            names = await asyncio.gather(*(w.submit(lambda: threading.current_thread().name) for _ in range(20)))
            assert set(names) <= {"t_0", "t_1"} and threading.current_thread().name not in names
            with pytest.raises(ZeroDivisionError):
                await w.submit(lambda: 1 / 0)
        finally:
            w.shutdown()

    asyncio.run(go())


def test_a_call_cancelled_while_queued_is_not_run():
    async def go():
        w = WorkerThreads(1, "t")
        gate, ran = threading.Event(), []
        try:
            busy = w.submit(gate.wait, 10)  # holds the only thread
            queued = w.submit(ran.append, "queued")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(queued, 0.05)  # the caller gives up: cancelled before it started
            gate.set()
            assert await busy is True
            assert await w.submit(ran.append, "after") is None  # FIFO: the cancelled one was passed over first
            assert ran == ["after"]
        finally:
            gate.set()
            w.shutdown()

    asyncio.run(go())


def test_shutdown_cancels_what_is_queued():
    async def go():
        w = WorkerThreads(1, "t")
        gate, started = threading.Event(), threading.Event()
        busy = w.submit(lambda: started.set() or gate.wait(10))
        queued = [w.submit(lambda: "never") for _ in range(3)]
        while not started.is_set():  # the thread has taken the first call
            await asyncio.sleep(0.001)
        w.shutdown()
        gate.set()
        assert await busy is True  # the running call finishes
        assert all(f.cancelled() for f in queued)

    asyncio.run(go())
