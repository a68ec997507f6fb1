"""`falconrec serve --workers 2`: two real server processes on one port, a real shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg
from service.server import bind
from tests.conftest import free_port, kill_process_group

SECRET = "workers-write-key-0123456789abcdef"
START_S = 180.0  # two spawned processes each load the models; CI is a busy 2-core box: poll, never assert a time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.fixture
def two_workers(tiny_build):
    port, gport = free_port(), free_port()
    env = {
        **os.environ,
        "FALCONREC_BUDGET_MS": "2000",
        "FALCONREC_MAX_BUDGET_MS": "5000",
        "FALCONREC_API_KEYS": f'["write:{SECRET}"]',
    }
    env.pop("FALCONREC_REDIS_URL", None)
    args = [
        sys.executable,
        "-m",
        "falconrec.cli",
        "serve",
        "--config",
        "tiny",
        "--artifacts",
        str(tiny_build.artifacts),
        "--repo",
        str(tiny_build.repo),
        "--port",
        str(port),
        "--grpc-port",
        str(gport),
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_S
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "workers did not become ready"
            time.sleep(0.3)
        yield proc, url, gport
    finally:
        kill_process_group(proc)


def test_two_workers_answer_on_one_port_refuse_local_writes_and_stop_together(two_workers, tiny_build):
    proc, url, gport = two_workers

    def pid_of_new_connection(_: int) -> int:
        with httpx.Client(base_url=url, timeout=30) as c:  # a new connection each time
            return c.get("/healthz").json()["pid"]

    # Both workers accept: a worker still loading its models does not, so keep asking (bounded).
    pids: set[int] = set()
    deadline = time.time() + START_S
    with ThreadPoolExecutor(8) as pool:
        while len(pids) < 2 and time.time() < deadline:
            pids |= set(pool.map(pid_of_new_connection, range(32)))
    assert len(pids) == 2 and proc.pid not in pids, pids

    uid = int(np.load(tiny_build.paths.data)["user_raw_ids"][0])
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/recommend", json={"user_id": uid, "k": 5})
        assert r.status_code == 200 and len(r.json()["items"]) == 5
        # Each worker has its own in-process store: a write would reach one of them only.
        ev = {"user_id": uid, "item_id": r.json()["items"][0]["item_id"], "ts": int(time.time()), "event_id": "w-1"}
        w = c.post("/v1/events", json={"events": [ev]}, headers={"authorization": f"Bearer {SECRET}"})
        assert w.status_code == 503 and "FALCONREC_REDIS_URL" in w.text, w.text
    with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:  # both bound the gRPC port too (SO_REUSEPORT)
        reply = pbg.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_id=uid, k=3), timeout=30)
        assert len(reply.items) == 3

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    deadline = time.time() + 30
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a worker outlived the server"


def test_the_shared_socket_hands_out_connections_with_nagle_off():
    """Connections accepted on the workers' socket have TCP_NODELAY, as on uvicorn's own: with Nagle on, a response
    written in two segments waits for the client's delayed ACK (40 ms on Linux)."""
    sock = bind("127.0.0.1", 0)
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def go():
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.02)
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(go())
    assert seen and seen[0] != 0
