"""4. slowbody: --slow-sockets connections send a POST /v1/recommend head that promises a 100-byte body and then
nothing, beside the normal recommend stream (issue 22, point 1: 64 such sockets held every admission slot for ever).
Counted: the normal requests' answers while the sockets are held and after they are answered, and what each slow
socket got (408 expected) after how long. tests/test_slow_clients.py makes the same attack in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass

from loadtest.hardening.options import Options
from loadtest.hardening.stack import Stack
from loadtest.hardening.stats import PhaseStats, counts, numbers_out, phase_table, spread, table
from loadtest.hardening.traffic import Stream
from loadtest.procs import LOOPBACK

HEAD = b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
INCOMPLETE = "FALCONREC_MAX_INCOMPLETE_PER_CLIENT"


def server_env(opts: Options) -> dict[str, str]:
    """All the sockets come from one address here (an attacker has many): let each of them hold on until its body
    deadline rather than be pushed out by the per-address cap at once (--server-env overrides this)."""
    return {INCOMPLETE: str(max(32, opts.slow_sockets + 32))}


@dataclass
class SlowSocket:
    status: int = 0  # 0: closed or timed out without an HTTP answer
    detail: str = ""
    seconds: float | None = None  # from the head sent to the answer


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait_s: float) -> SlowSocket:
    """Whatever the server says on a socket whose head was just sent, until it closes the connection."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = SlowSocket()
    try:
        with contextlib.suppress(TimeoutError, ConnectionError):
            data = await asyncio.wait_for(reader.read(), timeout=wait_s)  # read() = until EOF
            out.seconds = loop.time() - t0
            _parse(data, out)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return out


def _parse(data: bytes, out: SlowSocket) -> None:
    head, _, body = data.partition(b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0].split()
    if len(line) >= 2 and line[1].isdigit():
        out.status = int(line[1])
    try:
        out.detail = str(json.loads(body).get("detail", ""))[:120]
    except (ValueError, AttributeError):
        out.detail = body[:120].decode(errors="replace")


async def _open_all(s: Stack) -> list[asyncio.Task]:
    """Every slow socket open, its head sent, before the first normal request; one task per socket reads its answer."""
    port = int(s.http_url.rsplit(":", 1)[1])
    tasks = []
    for _ in range(s.opts.slow_sockets):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        writer.write(HEAD)
        await writer.drain()
        tasks.append(asyncio.create_task(_answer(reader, writer, s.opts.slow_wait_s)))
    return tasks


async def measure(s: Stack) -> tuple[str, dict]:
    a = s.opts
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    socks = await _open_all(s)
    phase = ["held"]  # until the first slow socket is answered, then 'released'
    marks = {"opened": loop.time() - t0}

    def first_answer(_: asyncio.Task) -> None:
        if "first_answer" not in marks:
            marks["first_answer"] = loop.time() - t0
            phase[0] = "released"

    for t in socks:
        t.add_done_callback(first_answer)
    stop = asyncio.Event()
    load = asyncio.create_task(Stream(s, a.rate, a.seed + 5).run(lambda: phase[0], stop, a.slow_wait_s + 60))
    try:
        slow = await asyncio.gather(*socks)
        marks["last_answer"] = loop.time() - t0
        await asyncio.sleep(a.slow_after_s)
    finally:
        stop.set()
        answers = await load
    held = marks.get("first_answer", marks["last_answer"]) - marks["opened"]
    stats = [PhaseStats.of("held", held, answers), PhaseStats.of("released", a.slow_after_s, answers)]
    md, raw = _section(s, slow, stats)
    return md, {**raw, "marks": marks}


def _section(s: Stack, slow: list[SlowSocket], stats: list[PhaseStats]) -> tuple[str, dict]:
    a = s.opts
    kinds = Counter(f"{x.status} {numbers_out(x.detail)}" if x.status else "no answer" for x in slow)
    answered = [x.seconds for x in slow if x.status]
    rows = [
        ("slow sockets answered", f"{len(answered)} of {len(slow)}: {counts(Counter(x.status for x in slow))}"),
        ("their answers", counts(kinds)),
        ("seconds from head to answer, min / p50 / max", spread(answered)),
        (
            "server settings",
            f"FALCONREC_BODY_TIMEOUT_S {s.server_setting('FALCONREC_BODY_TIMEOUT_S')}, "
            f"{INCOMPLETE} {s.server_setting(INCOMPLETE)}",
        ),
    ]
    md = (
        f"## Slow bodies: {a.slow_sockets} sockets send a head (content-length: 100) and no body, beside POST "
        f"/v1/recommend at {a.rate:g} req/s\n\n"
        + table(rows)
        + "Normal requests while the slow sockets are held (arrived before the first was answered), and after:\n\n"
        + phase_table(stats)
    )
    raw = {
        "slow": {"n": len(slow), "statuses": dict(Counter(x.status for x in slow)), "answers": dict(kinds)},
        "slow_seconds": answered,
        "normal": {st.phase: st.as_dict() for st in stats},
    }
    return md, raw
