"""Issues 9 and 22 over real HTTP (uvicorn on loopback): no 5xx from any input, the connection survives a failure,
protocol details (413/415/400, a body without a content type read as JSON), strict integers, the OpenAPI document
says what is enforced, responses counted by status, overload shed at arrival."""

from __future__ import annotations

import http.client
import re
import socket

import httpx
import pytest

from service.api.schemas import INT64_MAX
from service.catalog import Catalog


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


def _item(catalog) -> int:
    return int(catalog.raw_ids[0])


# --- 1. bounded integers ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, payload",
    [
        ("/v1/recommend", {"history": [{"item_id": 2**63, "ts": 1}]}),
        ("/v1/recommend", {"history": [{"item_id": "ITEM", "ts": 2**63}]}),
        ("/v1/recommend", {"history": [{"item_id": "ITEM", "ts": 1}], "query_ts": 2**63}),
        ("/v1/recommend", {"user_id": 2**63}),
        ("/v1/recommend", {"user_id": 10**400}),
        ("/v1/score", {"user_id": 1, "item_ids": [2**63]}),
        ("/v1/score", {"history": [{"item_id": "ITEM", "ts": 2**64}], "item_ids": ["ITEM"]}),
    ],
)
def test_integers_beyond_int64_are_422(client, catalog, path, payload):
    body = _fill(payload, _item(catalog))
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert "less than or equal to 9223372036854775807" in r.text or "integer" in r.text


def test_largest_int64_is_served(client, catalog):
    item = _item(catalog)
    r = client.post("/v1/recommend", json={"history": [{"item_id": item, "ts": INT64_MAX}], "query_ts": INT64_MAX})
    assert r.status_code == 200, r.text
    body = {"history": [{"item_id": item, "ts": 0}], "query_ts": INT64_MAX, "item_ids": [item]}
    r = client.post("/v1/score", json=body)
    assert r.status_code == 200, r.text
    assert client.post("/v1/recommend", json={"user_id": INT64_MAX}).status_code == 404


WRITE_KEY = "hardening-write-key-0123456789"


@pytest.fixture(scope="module")
def keyed(tiny_build):
    from tests.conftest import RunningServer, server_settings

    srv = RunningServer(server_settings(tiny_build, grpc_port=0, api_keys=[f"write:{WRITE_KEY}"]))
    yield srv
    srv.stop()


# --- issue 22, 6. strict integers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path, payload, field",
    [
        # A string id is schema-valid (string-id catalogs, issue 24); this catalog's ids are integers: 422 all the same.
        ("/v1/recommend", {"user_id": "USER"}, "user_id"),
        ("/v1/recommend", {"user_id": "USER", "k": True}, "k"),
        ("/v1/recommend", {"user_id": True}, "user_id"),
        ("/v1/recommend", {"user_id": "USERINT", "k": True}, "k"),
        ("/v1/recommend", {"user_id": "USERINT", "num_candidates": "50"}, "num_candidates"),
        ("/v1/recommend", {"user_id": "USERINT", "k": 5.0}, "k"),
        ("/v1/recommend", {"history": [{"item_id": "ITEMSTR", "ts": 1}]}, "history"),
        ("/v1/recommend", {"history": [{"item_id": "ITEM", "ts": False}]}, "history"),
        ("/v1/recommend", {"user_id": "USERINT", "query_ts": "1"}, "query_ts"),
        ("/v1/recommend", {"user_id": "USERINT", "budget_ms": "50"}, "budget_ms"),
        ("/v1/recommend", {"user_id": "USERINT", "exclude_seen": 1}, "exclude_seen"),
        ("/v1/score", {"user_id": "USERINT", "item_ids": [True]}, "item_ids"),
        ("/v1/score", {"user_id": "USERINT", "item_ids": ["ITEMSTR"]}, "item_ids"),
    ],
)
def test_ids_times_and_counts_are_strict_integers(client, catalog, path, payload, field):
    """`true` or `"1"` where an integer belongs is a 422 naming the field (lax mode read true as 1 and answered
    200 to `{"user_id": "1", "k": true}`)."""
    r = client.post(path, json=_fill(payload, _item(catalog), next(iter(catalog.user_histories))))
    assert r.status_code == 422, r.text
    assert any(e["loc"][:2] == ["body", field] for e in r.json()["detail"]), r.text


def test_events_refuse_booleans_for_ids_and_times(keyed, catalog):
    """`{"events": [{"user_id": true, "item_id": true, "ts": false}]}` answered 200 and wrote user 1, item 1, ts 0."""
    auth = {"authorization": f"Bearer {WRITE_KEY}"}
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        for event in (
            {"user_id": True, "item_id": True, "ts": False},
            {"user_id": "1", "item_id": _item(catalog), "ts": 1},
            {"user_id": 1, "item_id": _item(catalog), "ts": 1.0},
        ):
            r = c.post("/v1/events", json={"events": [event]}, headers=auth)
            assert r.status_code == 422, (event, r.text)
        r = c.post("/v1/items", json={"items": [{"item_id": "123456789", "text": "t"}]}, headers=auth)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "items", 0, "item_id"], r.text
        ok = c.post("/v1/events", json={"events": [{"user_id": 1, "item_id": _item(catalog), "ts": 1}]}, headers=auth)
        assert ok.status_code == 200, ok.text  # the same event with integers is written


def _fill(obj, item: int, user: int | None = None):
    if obj == "USER":
        return str(user)
    if obj == "USERINT":
        return user
    if obj == "ITEMSTR":
        return str(item)
    if obj == "ITEM":
        return item
    if isinstance(obj, dict):
        return {k: _fill(v, item, user) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, item, user) for v in obj]
    return obj


def test_connection_survives_an_internal_error(server, catalog, monkeypatch):
    """A bug answers 500 and the keep-alive connection carries the next request (it was dropped without
    `Connection: close`, so the client's next valid request failed). A bug cannot be caused by input any more,
    so this one is injected: the only fault in this file that is not real."""
    rec = server.components.recommender

    async def broken(*args, **kwargs):
        raise RuntimeError("injected fault at /srv/secret/path 10.0.0.1:6379")

    conn = http.client.HTTPConnection("127.0.0.1", server.settings.port, timeout=30)
    body = f'{{"user_id": {next(iter(catalog.user_histories))}}}'
    headers = {"content-type": "application/json"}
    try:
        monkeypatch.setattr(rec, "recommend", broken)
        conn.request("POST", "/v1/recommend", body, headers)
        first = conn.getresponse()
        payload = first.read().decode()
        assert first.status == 500 and first.getheader("connection") != "close"
        assert payload == '{"detail":"internal error"}'  # nothing of the exception
        sock = conn.sock
        monkeypatch.undo()
        conn.request("POST", "/v1/recommend", body, headers)
        second = conn.getresponse()
        second.read()
        assert second.status == 200 and conn.sock is sock  # same connection, not a reconnect
    finally:
        monkeypatch.undo()
        conn.close()


def test_connection_survives_4xx(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.settings.port, timeout=30)
    try:
        for body, status in [(b"{not json", 422), (b'{"user_id": 987654321}', 404), (b'{"user_id": -1}', 422)]:
            conn.request("POST", "/v1/recommend", body, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            assert r.status == status
    finally:
        conn.close()


# --- 6. protocol details ------------------------------------------------------------------------------
def _raw(port: int, head: bytes, chunks: list[bytes]) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head)
        for c in chunks:
            s.sendall(c)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            got = s.recv(65536)
            if not got:
                break
            data += got
    return int(data.split(b" ", 2)[1]), data


def _length(data: bytes) -> int:
    m = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n")[0], re.I)
    return int(m.group(1)) if m else 0


def test_chunked_body_over_the_cap_is_413(server):
    cap = server.settings.max_body_bytes
    piece = b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * (cap // len(piece) + 2) + [b"0\r\n\r\n"]
    head = (
        b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    status, data = _raw(server.settings.port, head, chunks)
    assert status == 413, data[:300]
    assert b"connection: close" in data.lower()


def test_wrong_content_type_is_415(client):
    r = client.post("/v1/recommend", content=b'{"user_id": 1}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["detail"]
    ok = client.post("/v1/recommend", content=b'{"user_id": 987654321}', headers={"content-type": "application/json"})
    assert ok.status_code == 404  # the right type goes through (to an unknown user)


def test_body_without_content_type_is_read_as_json(server, client, catalog):
    """What the README says; it answered 422 "Input should be a valid dictionary" (FastAPI left the bytes unparsed)."""
    body = b'{"user_id": %d, "k": 3}' % next(iter(catalog.user_histories))
    r = client.post("/v1/recommend", content=body)
    assert "content-type" not in r.request.headers
    assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text
    head = b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    status, data = _raw(server.settings.port, head, [body])
    assert status == 200, data[:300]
    bad = client.post("/v1/recommend", content=b'{"user_id": }')
    assert bad.status_code == 422 and bad.json()["detail"][0]["type"] == "json_invalid", bad.text


def test_invalid_utf8_is_400_with_a_reason(client):
    r = client.post("/v1/recommend", content=b'{"user_id": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8" in r.json()["detail"]


@pytest.mark.parametrize("budget", [5e-324, 1e-9, 0.05])
def test_budgets_too_small_to_answer_are_422(client, catalog, budget):
    """A budget no request can meet is the caller's error (422), not overload (it answered 503 + Retry-After,
    and retrying cannot help)."""
    r = client.post("/v1/recommend", json={"user_id": next(iter(catalog.user_histories)), "budget_ms": budget})
    assert r.status_code == 422 and "minimum" in r.text


def test_openapi_documents_errors_and_limits(client, server):
    doc = client.get("/openapi.json").json()
    for path in ("/v1/recommend", "/v1/score"):
        codes = set(doc["paths"][path]["post"]["responses"])
        assert {"200", "400", "404", "413", "415", "422", "503"} <= codes, codes
        assert "Retry-After" in doc["paths"][path]["post"]["responses"]["503"]["headers"]
    schemas = doc["components"]["schemas"]
    s = server.settings

    def prop(schema: str, name: str) -> dict:
        spec = schemas[schema]["properties"][name]
        return next((b for b in spec.get("anyOf", []) if b.get("type") != "null"), spec)

    assert prop("RecommendRequest", "k")["maximum"] == s.max_k
    assert prop("RecommendRequest", "history")["maxItems"] == s.max_history
    assert prop("RecommendRequest", "num_candidates")["maximum"] == s.max_candidates
    assert prop("ScoreRequest", "item_ids")["maxItems"] == s.max_score_items
    assert prop("ScoreRequest", "budget_ms")["maximum"] == s.max_budget_ms
    assert prop("ScoreRequest", "budget_ms")["minimum"] == s.min_budget_ms
    assert schemas["HistoryItem"]["properties"]["ts"]["maximum"] == INT64_MAX
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in metrics and "application/json" not in metrics


# --- 7. visibility ------------------------------------------------------------------------------------
def _value(text: str, line_start: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_responses_are_counted_by_status(client):
    name = 'falconrec_responses_total{endpoint="/v1/recommend",status="404"}'
    before = _value(client.get("/metrics").text, name)
    for _ in range(3):
        assert client.post("/v1/recommend", json={"user_id": 987654321}).status_code == 404
    text = client.get("/metrics").text
    assert _value(text, name) == before + 3
    assert 'falconrec_responses_total{endpoint="/metrics",status="200"}' in text


def test_score_at_the_minimum_budget_is_answered_not_a_retryable_503(client, catalog):
    """Issue 22, point 8: /v1/score cannot shrink its work (the caller named the items), so at the documented
    minimum budget (0.1 ms) it answers the scores and says it ran over; it answered 503 "retry shortly" (5 of 20
    tries), and a retry could not help. Each try misses the K/V cache (its own query_ts): the history pass runs."""
    uid = next(iter(catalog.user_histories))
    items = catalog.raw_ids[: min(1000, len(catalog.raw_ids))].tolist()
    shed = 'falconrec_shed_total{endpoint="score"}'
    before = _value(client.get("/metrics").text, shed)
    late = 0
    for i in range(20):
        body = {"user_id": uid, "item_ids": items, "budget_ms": 0.1, "query_ts": 1_700_000_000 + 86_400 * 365 * i}
        r = client.post("/v1/score", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out["scores"]) == len(items)
        late += any("budget ran out" in reason for reason in out["degraded_reasons"])
    assert late > 0  # 0.1 ms is too little for the ranker here: answered, marked degraded
    assert _value(client.get("/metrics").text, shed) == before


# --- 5. overload --------------------------------------------------------------------------------------
def test_shed_at_once_when_the_queue_ahead_cannot_finish_in_time(tiny_build, catalog):
    """A request that cannot get a slot within its budget is refused on arrival, not after waiting the whole
    budget out (the 503s of a 2x overload took 28 ms at p50 for a 20 ms budget)."""
    import asyncio

    from tests.conftest import RunningServer, server_settings

    srv = RunningServer(server_settings(tiny_build, max_active=1, grpc_port=0, budget_ms=20.0))
    users = list(catalog.user_histories)[:40]
    try:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                return await asyncio.gather(*[c.post("/v1/recommend", json={"user_id": u}) for u in users])

        rs = asyncio.run(burst())
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 503} and 200 in codes, codes
        shed = [r for r in rs if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" for r in shed)
        early = [r for r in shed if "cannot finish within" in r.json()["detail"]]
        assert early, [r.json()["detail"] for r in shed]
    finally:
        srv.stop()


def _one_slot_held(tiny_build, **overrides):
    """A real server with one pipeline slot, held by a patient request until `release` is set: (server, its
    admission, release, the holder's future)."""
    import asyncio
    import threading

    from service.pipeline.deadline import Deadline
    from tests.conftest import RunningServer, server_settings

    srv = RunningServer(server_settings(tiny_build, max_active=1, grpc_port=0, **overrides))
    adm = srv.components.recommender.admission
    loop = srv.server.servers[0].get_loop()
    release = threading.Event()

    async def hold_the_slot() -> None:
        async with adm.admitted(Deadline(120.0), patient=True):
            await loop.run_in_executor(None, release.wait)

    return srv, adm, release, asyncio.run_coroutine_threadsafe(hold_the_slot(), loop)


def test_overload_is_shed_at_arrival_with_its_server_time(tiny_build, catalog):
    """Round 3, point 9: with the only pipeline slot taken and a queue that cannot drain within 20 ms, a newcomer
    is answered 503 by the HTTP guard on arrival, before FastAPI parses it (shed by admission after parsing and
    validation, those 503s took p50 29.8 ms at 4x load), its server time in `Server-Timing: total`, counted as
    a 503 of `recommend`. One with a budget the queue can meet is not shed: it waits and is served."""
    import asyncio
    import math

    srv, adm, release, held = _one_slot_held(tiny_build, max_concurrency=500, budget_ms=20.0)
    users = list(catalog.user_histories)
    # Enough patient requests queued that (queue + 1/2) x the slot's hold time is well over 20 ms.
    n_queued = math.ceil(0.05 / adm.hold_s) + 2
    metrics = lambda: httpx.get(f"{srv.url}/metrics").text  # noqa: E731
    answered_503 = 'falconrec_answers_total{endpoint="recommend",status="503",transport="http"}'

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response, float, float]:
        limits = httpx.Limits(max_connections=n_queued + 20)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            patient = [
                asyncio.ensure_future(c.post("/v1/recommend", json={"user_id": u, "budget_ms": 5000}))
                for u in users[:n_queued]
            ]
            while adm.waiting < n_queued:
                await asyncio.sleep(0.01)
            before = _value(metrics(), answered_503)
            shed = [await c.post("/v1/recommend", json={"user_id": u}) for u in users[:5]]
            after = _value(metrics(), answered_503)
            waits = asyncio.ensure_future(c.post("/v1/recommend", json={"user_id": users[0], "budget_ms": 5000}))
            while adm.waiting < n_queued + 1:
                await asyncio.sleep(0.01)
            release.set()
            return await asyncio.gather(*patient), shed, await waits, before, after

    try:
        served, shed, waited, before, after = asyncio.run(scenario())
        held.result(timeout=30)
    finally:
        release.set()
        srv.stop()
    for r in shed:
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert "queued ahead cannot finish within the budget" in r.json()["detail"]
        assert r.headers["server-timing"].startswith("total;dur=")
    assert after - before == len(shed)
    assert waited.status_code == 200 and all(r.status_code == 200 for r in served)


def test_a_recommendation_let_into_the_queue_is_answered_not_refused_late(tiny_build, catalog):
    """Issue 26, shed at once: a request is refused on arrival or not at all. One let into the queue whose slot never
    frees in time (the queue drained slower than expected) is answered with the shortest answer, recall order, and
    says why; a late 503 took most of the budget for nothing. A score (no shorter answer) is still refused."""
    import asyncio
    import time

    from service.errors import Overloaded
    from service.pipeline.admission import Admission
    from service.pipeline.deadline import Deadline

    async def unit() -> tuple[bool, str]:
        adm = Admission(max_active=1)
        release = asyncio.Event()

        async def holder() -> None:
            async with adm.admitted(Deadline(5.0)):
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        async with adm.admitted(Deadline(0.05), answer=True) as slot:  # queued: 2.5 ms + ~3 ms expected
            assert adm.active == 1 and adm.waiting == 0  # the holder's slot only; this one holds none
        try:
            async with adm.admitted(Deadline(0.05)):
                refused = ""
        except Overloaded as e:
            refused = str(e)
        release.set()
        await task
        return slot, refused

    slot, refused = asyncio.run(unit())
    assert slot is False and "no pipeline slot within the 50 ms budget" in refused

    srv, adm, release, held = _one_slot_held(tiny_build)
    try:
        while adm.active == 0:
            time.sleep(0.01)
        user = next(iter(catalog.user_histories))
        r = httpx.post(f"{srv.url}/v1/recommend", json={"user_id": user, "k": 3, "budget_ms": 300}, timeout=30)
    finally:
        release.set()
        held.result(timeout=30)
        srv.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 3 and body["candidates_ranked"] == 0
    assert body["degraded"] and "budget: no pipeline slot in time, recall order" in body["degraded_reasons"]


def test_expected_wait_counts_requests_not_yet_queued():
    """Requests past the HTTP guard but still being parsed will queue ahead of a newcomer: they count."""
    from service.pipeline.admission import Admission

    adm = Admission(max_active=2)
    assert adm.expected_wait() == 0.0 and adm.expected_wait(not_yet_queued=1) == 0.0  # a slot is free for it
    slow = adm.expected_wait(not_yet_queued=10)
    assert slow == (10 - 2 + 0.5) * adm.hold_s / 2
    assert adm.overloaded(slow / 2, not_yet_queued=10) is not None
    assert adm.overloaded(slow * 2, not_yet_queued=10) is None


def test_a_recommendation_that_cannot_answer_in_its_budget_is_not_started():
    """Issue 26: admission leaves room for the shortest useful answer (learned from served requests): a recommendation
    whose queue ahead plus that cannot fit what is left of its budget is refused at once, not made to wait and then
    answered late; a score (no shorter answer to fall back on) is judged on the queue alone."""
    import asyncio
    import time

    from service.errors import Overloaded
    from service.pipeline.admission import Admission
    from service.pipeline.deadline import Deadline

    adm = Admission(max_active=1)
    for _ in range(100):
        adm.note_base(0.008)  # the served requests' history + tower + recall + top k took 8 ms
    assert 0.0119 < adm.base_s < 0.0121  # with its margin

    async def main() -> str:
        release = asyncio.Event()

        async def holder() -> None:
            async with adm.admitted(Deadline(5.0)):
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)  # the holder has the only slot until the refusal below
        late = Deadline(0.020, start=time.perf_counter() - 0.012)  # 8 ms left: < 2.5 ms of queue + 12 ms
        try:
            async with adm.admitted(late, answer=True):
                refused = ""
        except Overloaded as e:
            refused = str(e)
        assert adm.active == 1 and adm.waiting == 0  # refused before waiting: the holder still holds its slot
        # With the slot busy and one request ahead, 8 ms is enough to wait for a slot, not to also answer.
        assert adm.overloaded(0.008, not_yet_queued=1, answer=False) is None
        assert "an answer needs" in (adm.overloaded(0.008, not_yet_queued=1, answer=True) or "")
        release.set()
        await task
        return refused

    refused = asyncio.run(main())
    assert "cannot finish within the 20 ms budget and leave the 12.0 ms an answer needs" in refused
    adm.reset_base()
    assert adm.base_s < 0.004  # warm-up's cold runs forgotten
