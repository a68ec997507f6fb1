"""Running the service: HTTP (uvicorn) and gRPC in one process and one event loop (`serve`), or, with
`falconrec serve --workers N`, N such server processes accepting on one listening socket (`run_workers`).

Why processes: on two cores one process spent its request time waiting on thread hand-offs (event loop ->
inference thread pool -> back) and on the GIL, with both cores far from busy (issue 11's profile). Each worker
here is a whole server (models, caches, admission, gRPC) and the kernel spreads connections over the workers
that are ready to accept. The parent only binds the socket, supervises and forwards SIGINT/SIGTERM.

What is per worker: /metrics (a scrape sees the worker that accepted it), the K/V and user-vector caches, the
admission limit (max_active each), and, without Redis, the in-process store: that is why writes need Redis.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import time

import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.http_protocol import protocol_for
from service.settings import Settings

log = logging.getLogger("falconrec.server")
STOP_GRACE_S = 15.0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only when the socket says
    # it is TCP. Without it Nagle held each response's last segment for the client's delayed ACK, and ~10 % of
    # requests under load took 40 ms longer (issue 11's two-worker runs: a second latency mode at 50-70 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror}; set FALCONREC_PORT or --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def per_worker(settings: Settings) -> Settings:
    """Each worker's settings: the cores split between the workers' inference threads unless set."""
    if settings.inference_workers is not None:
        return settings
    threads = max(1, (os.cpu_count() or 2) // settings.workers)
    return settings.model_copy(update={"inference_workers": threads})


def _worker_main(settings: Settings, sock: socket.socket, index: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {index} %(name)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; uvicorn handles SIGTERM itself
    serve(settings, sockets=[sock])


def run_workers(settings: Settings) -> int:
    """Start `settings.workers` servers on one socket; return when they have stopped (the exit status)."""
    sock = bind(settings.host, settings.port)
    ctx = mp.get_context("spawn")  # not fork: the parent may hold torch / OpenMP state from the CLI
    child = per_worker(settings)
    procs = [
        ctx.Process(target=_worker_main, args=(child, sock, i), name=f"falconrec-worker-{i}")
        for i in range(settings.workers)
    ]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.start()
    log.info("%d workers on http://%s:%d (pids %s)", len(procs), settings.host, settings.port, [p.pid for p in procs])
    status = 0
    try:
        while not stopping:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                # One worker gone leaves a server that answers some connections and not others: stop them all
                # and say so, so the supervisor (systemd, Kubernetes, docker) restarts a whole one.
                log.error("worker %s exited with %s; stopping the others", dead[0].name, dead[0].exitcode)
                status = dead[0].exitcode or 1
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        sock.close()
    return status


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for `app` (the server and the tests' servers alike): httptools with read deadlines and
    the per-address limit on incomplete requests (service.api.http_protocol)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        loop=settings.event_loop,
        http=protocol_for(settings),
    )


def serve(settings: Settings, sockets: list | None = None) -> None:
    """HTTP (uvicorn) and gRPC in one process and one event loop (on `sockets` when a parent bound them).

    uvicorn makes the loop (`event_loop`: uvloop where installed). The server ran on asyncio's own loop when it
    was started with asyncio.run here, and only the tests' servers (uvicorn's run) had uvloop."""
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    log.info("HTTP on http://%s:%d  gRPC on %s:%d", settings.host, settings.port, settings.host, settings.grpc_port)
    server.run(sockets=sockets)


def run(settings: Settings) -> None:
    if settings.workers > 1:
        raise SystemExit(run_workers(settings))
    serve(settings)
