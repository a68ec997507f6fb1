"""6. freeze: POST /v1/events with Redis frozen (SIGSTOP) is answered 503, yet the write sits in Redis's input
buffer and runs when it resumes (issue 22, points 3 and 5: the retry the answer asked for appended every event
twice). Each batch is sent frozen, Redis resumed, then retried exactly as the 503 says (after Retry-After, with the
same Idempotency-Key), and each event counted in the user's stored history. Batches retried without a key show
what the key prevents. tests/test_write_retries.py makes the same attack in-process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from loadtest.hardening.stack import Stack
from loadtest.hardening.stats import counts, numbers_out, table
from service.stores.base import VERSION_KEY, hist_key, unpack_history


@dataclass
class Batch:
    user_id: int
    events: list[dict]
    key: str | None  # the Idempotency-Key, None for an unkeyed retry
    statuses: list[int] = field(default_factory=list)  # the frozen answer, then each retry's
    first_detail: str = ""
    retry_after: str | None = None
    stored: list[int] = field(default_factory=list)  # how many times each event is in the history


async def _until_ready(c: httpx.AsyncClient, timeout_s: float = 60.0) -> None:
    """Wait for /readyz ok (Redis marked up again after the previous freeze) so each freeze starts from health."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if (await c.get("/readyz")).json().get("status") == "ok":
                return
        await asyncio.sleep(0.1)


async def _send(c: httpx.AsyncClient, s: Stack, b: Batch) -> None:
    headers = {**s.auth, **({"Idempotency-Key": b.key} if b.key else {})}
    await _until_ready(c)
    s.redis.freeze()
    try:
        r = await c.post("/v1/events", json={"events": b.events}, headers=headers)
    finally:
        s.redis.cont()  # whatever happened: the other parts need Redis
    b.statuses.append(r.status_code)
    b.first_detail = str(r.json().get("detail", ""))[:160] if r.status_code != 200 else ""
    b.retry_after = r.headers.get("retry-after")
    for _ in range(s.opts.freeze_retries):  # as the answer says: after Retry-After, the same request
        if r.status_code != 503:
            break
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
        r = await c.post("/v1/events", json={"events": b.events}, headers=headers)
        b.statuses.append(r.status_code)


def _count_stored(s: Stack, batches: list[Batch]) -> None:
    """How many times each event of each batch is in its user's history, as the store holds it."""
    with s.redis.client() as r:
        version = r.get(VERSION_KEY).decode()
        for b in batches:
            raw = r.get(hist_key(version, b.user_id))
            pairs = list(zip(*(a.tolist() for a in unpack_history(raw)), strict=True)) if raw else []
            b.stored = [pairs.count((e["item_id"], e["ts"])) for e in b.events]


def _batches(s: Stack) -> list[Batch]:
    """One user per batch, among the least active (their short histories are read fast), events at fresh times."""
    a = s.opts
    t0 = int(time.time()) - 3600
    out = []
    for i in range(a.freeze_batches + a.freeze_unkeyed):
        uid = int(s.users[-(i + 1)])
        items = [int(x) for x in s.items[(i * a.freeze_events) % len(s.items) :][: a.freeze_events]]
        events = [{"user_id": uid, "item_id": it, "ts": t0 + 10 * i + j} for j, it in enumerate(items)]
        key = f"harness-freeze-{a.seed}-{i}" if i < a.freeze_batches else None
        out.append(Batch(uid, events, key))
    return out


async def measure(s: Stack) -> tuple[str, dict]:
    batches = _batches(s)
    async with httpx.AsyncClient(base_url=s.http_url, timeout=s.opts.request_timeout_s + 30) as c:
        for b in batches:
            await _send(c, s, b)
        await _until_ready(c)
    await asyncio.to_thread(_count_stored, s, batches)
    return _section(s, batches)


def _stored_counts(batches: list[Batch]) -> dict[str, int]:
    n = Counter(x for b in batches for x in b.stored)
    return {"once": n[1], "twice": n[2], "not stored": n[0], "more": sum(v for k, v in n.items() if k > 2)}


def _section(s: Stack, batches: list[Batch]) -> tuple[str, dict]:
    a = s.opts
    keyed, unkeyed = [b for b in batches if b.key], [b for b in batches if not b.key]
    raw = {
        "keyed": _stored_counts(keyed),
        "unkeyed": _stored_counts(unkeyed),
        "first_statuses": dict(Counter(b.statuses[0] for b in batches)),
        "attempts": [len(b.statuses) for b in batches],
        "final_statuses": dict(Counter(b.statuses[-1] for b in batches)),
        "retry_after": dict(Counter(str(b.retry_after) for b in batches)),
        "first_details": dict(Counter(numbers_out(b.first_detail) for b in batches)),
    }

    def line(c: dict) -> str:
        return f"stored once {c['once']} / stored twice {c['twice']} / not stored {c['not stored']} / more {c['more']}"

    rows = [
        ("answer while frozen", f"{counts(raw['first_statuses'])}; Retry-After: {counts(raw['retry_after'])}"),
        ("its detail", counts({f"`{k}`": v for k, v in raw["first_details"].items()})),
        ("requests per batch (frozen + retries)", " ".join(map(str, raw["attempts"]))),
        ("last answer", counts(raw["final_statuses"])),
        (f"events retried with the same Idempotency-Key ({len(keyed)} batch(es))", line(raw["keyed"])),
        (f"events retried without a key ({len(unkeyed)} batch(es))", line(raw["unkeyed"]) if unkeyed else "–"),
    ]
    md = (
        f"## Redis frozen during a write: {len(batches)} batches of {a.freeze_events} POST /v1/events, each sent "
        "with Redis SIGSTOPped, then SIGCONT and retried as the 503 says\n\n" + table(rows)
    )
    return md, raw
