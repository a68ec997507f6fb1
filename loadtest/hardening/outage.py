"""1. outage: Redis SIGKILLed under load for --outage-s, restarted and reloaded; answers counted per phase (healthy,
outage, reload, after), each request in the phase of its arrival."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from loadtest.hardening.stack import Stack, load_redis
from loadtest.hardening.stats import PhaseStats, fmt, phase_table
from loadtest.hardening.traffic import Answer, Stream

PHASES = ("healthy", "outage", "reload", "after")


async def _ready_after(s: Stack, seconds: float) -> float | None:
    """Seconds until /readyz first says ok, watched for `seconds` (None: not within them)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with httpx.AsyncClient(base_url=s.http_url, timeout=2.0) as c:
        while loop.time() - t0 < seconds:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if (await c.get("/readyz")).json().get("status") == "ok":
                    return loop.time() - t0
            await asyncio.sleep(0.25)
    return None


async def _timeline(s: Stack, phase: list[str], marks: dict[str, float]) -> float | None:
    """Kill, wait, restart, reload, watch: the phase label moves along as it goes. Returns /readyz's ok time."""
    a = s.opts
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.sleep(a.healthy_s)
    marks["kill"] = loop.time() - t0
    s.redis.kill()
    phase[0] = "outage"
    await asyncio.sleep(a.outage_s)
    marks["restart"] = loop.time() - t0
    phase[0] = "reload"
    await asyncio.to_thread(s.redis.start)
    marks["load_redis_s"] = await asyncio.to_thread(load_redis, a, s.env, s.out / "load-redis.log")
    marks["after"] = loop.time() - t0
    phase[0] = "after"
    ready = asyncio.create_task(_ready_after(s, a.after_s))
    await asyncio.sleep(a.after_s)  # the 'after' phase lasts after_s whenever /readyz says ok
    return await ready


async def measure(s: Stack) -> tuple[str, dict]:
    a = s.opts
    phase = ["healthy"]
    marks: dict[str, float] = {}
    stop = asyncio.Event()
    stream = Stream(s, a.rate, a.seed + 1)
    budget = a.healthy_s + a.outage_s + a.load_timeout_s + a.after_s + 60
    t0 = asyncio.get_running_loop().time()
    load = asyncio.create_task(stream.run(lambda: phase[0], stop, budget))
    try:
        ready_after = await _timeline(s, phase, marks)
    finally:
        stop.set()
        answers = await load
    return _section(s, answers, marks, ready_after, t0)


def _section(s: Stack, answers: list[Answer], marks: dict, ready_after: float | None, t0: float) -> tuple[str, dict]:
    a = s.opts
    seconds = {
        "healthy": marks.get("kill", 0.0),
        "outage": marks.get("restart", 0.0) - marks.get("kill", 0.0),
        "reload": marks.get("after", 0.0) - marks.get("restart", 0.0),
        "after": float(a.after_s),
    }
    stats = [PhaseStats.of(p, seconds[p], answers) for p in PHASES]
    after = [x for x in answers if x.phase == "after"]
    not_clean = [x.t - t0 - marks["after"] for x in after if x.status != 200 or x.store_degraded]
    last = f"+{max(not_clean):.2f} s" if not_clean else "none"
    first_503 = [x.t - t0 - marks["kill"] for x in answers if x.phase == "outage" and x.status == 503]
    md = (
        f"## Redis outage: SIGKILL for {a.outage_s:g} s, restart, `load-redis`, then {a.after_s:g} s\n\n"
        f"POST /v1/recommend for known users at {a.rate:g} req/s (Poisson), server budget {a.budget_ms:g} ms.\n\n"
        + phase_table(stats)
        + f"- `load-redis` after the restart took {marks['load_redis_s']:.1f} s; /readyz said ok "
        f"{fmt(ready_after, 2)} s after it finished.\n"
        f"- first 503 {fmt(min(first_503) if first_503 else None, 2)} s after the kill; last answer "
        f"that was not a 200 or was degraded by the store, in 'after': {last}.\n"
    )
    raw = {"marks": marks, "ready_after_s": ready_after, "phases": [st.as_dict() for st in stats]}
    return md, raw
