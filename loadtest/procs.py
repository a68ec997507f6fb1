"""Process plumbing shared by the tests and the measuring tools: free loopback ports, a private redis-server that can
be frozen and killed, stopping a process group, reading a process's CPU time and memory, percentiles.

One home for what tests/conftest.py, loadtest/hardening/ and loadtest/openloop.py each carried a copy of. Standard
library, numpy and redis-py only: the tests import it, so it must not import locust (gevent patches the process) nor
anything heavy. exporters/ sits below loadtest/ and keeps its own three-line port finder (tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on right now (the kernel's pick; another process may take it before we bind it, which
    on a private loopback is rare enough)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- process groups ---------------------------------------------------------------------------------------------
def start_serve(
    args: list[str], env: dict[str, str], log: Path, timeout_s: float = 300.0
) -> tuple[subprocess.Popen, str]:
    """A real `falconrec serve` (HTTP on a free loopback port, no gRPC) in its own process group, waited for until
    /readyz says 200: (process, base URL). Raises with the log's name when it exits or is not ready in time."""
    import sys
    import urllib.error
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "falconrec.cli", "serve", "--port", str(port), "--grpc-port", "0", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{LOOPBACK}:{port}"
    end = time.time() + timeout_s
    while time.time() < end and proc.poll() is None:
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(f"{url}/readyz", timeout=1) as r,
        ):
            if r.status == 200:
                return proc, url
        time.sleep(0.2)
    stop_group(proc)
    raise RuntimeError(f"the server did not become ready (see {log})")


def stop_group(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """SIGTERM a process group started with start_new_session=True, SIGKILL it after `grace_s`: the polite stop (a
    server flushes its log and stops its own children on SIGTERM)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a frozen process does not act on SIGTERM
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)
            return


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started (tritonserver's Python backend
    stubs outlived the server when only its pid was killed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=30)


# --- /proc readings -----------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/PID/status): what the kernel charges it, allocator slack
    included, which is what an id-sized table would show up in."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid}")


def _parent_of(stat: str) -> int:
    return int(stat.rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    """Live child processes of `pid`, from /proc/*/stat (no psutil: not a dependency)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # a process may exit while we read it
            if _parent_of((entry / "stat").read_text()) == pid:
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of `pid` (a `serve --workers N` server's worker children start their own)."""
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> list[str]:
    """argv of a process ([] once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def find_descendant(pid: int, *words: str) -> int | None:
    """The first descendant of `pid` whose argv holds every one of `words` (e.g. the ingestion worker)."""
    for child in descendants(pid):
        argv = cmdline(child)
        if argv and all(w in argv for w in words):
            return child
    return None


# --- a private redis-server ---------------------------------------------------------------------------------------
class RedisProcess:
    """A redis-server of our own on a free loopback port (nothing saved), to freeze, kill and restart at will: the
    shared one on 6379 is never frozen or killed. Started by the constructor unless start=False."""

    def __init__(self, port: int | None = None, password: str | None = None, start: bool = True):
        self.port = port or free_port()
        self.password = password
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it (again, after a kill: same port, empty) and wait until it answers PING."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        args = [exe, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        # Its own session: a Ctrl-C meant for the caller must not take Redis down before the caller's cleanup.
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.ping():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def client(self, **kwargs):
        import redis  # here: most users of this module never talk to Redis themselves

        return redis.Redis(host=LOOPBACK, port=self.port, password=self.password, **kwargs)

    def ping(self) -> bool:
        import redis

        try:
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, the worst kind of outage (a command already sent
        still runs when it resumes)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    stop = freeze  # the tests' older name

    def cont(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL (works on a frozen process too): the data is gone with it, nothing is saved."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


# --- percentiles --------------------------------------------------------------------------------------------------
def pct(values: Sequence[float] | np.ndarray, q: float, digits: int | None = None) -> float | None:
    """The q-th percentile (numpy's linear interpolation), None for no values; rounded when `digits` is given."""
    if len(values) == 0:
        return None
    v = float(np.percentile(np.asarray(values, dtype=float), q))
    return v if digits is None else round(v, digits)


def percentiles(
    values: Sequence[float] | np.ndarray, qs: Iterable[float] = (50, 99), digits: int | None = None
) -> dict[str, float | None]:
    """{"p50": ..., "p99": ...} for each q in `qs` (None when there are no values)."""
    return {f"p{q:g}": pct(values, q, digits) for q in qs}
