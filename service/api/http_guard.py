"""The ASGI layer in front of every route: what no input may get past.

- the body of a POST /v1/* is read here, whole, capped and timed, before the request counts as in flight: 408
  and close when it has not arrived within `body_timeout_s` (64 sockets that sent a head and nothing more held
  every slot for ever), 413 over `max_body_bytes` whether or not it declared a Content-Length (a chunked 10 MB
  body answered 400), 415 for a non-JSON content type, 400 with the reason for invalid UTF-8; a body without a
  content type is read as JSON; the route then reads the buffered body;
- bounded concurrency: beyond `max_concurrency` whole requests in flight, 503 + Retry-After at once;
- shedding at arrival: a /v1/recommend or /v1/score whose budget the pipeline's queue cannot drain in time is
  answered 503 here, before FastAPI parses it (those 503s took p50 29.8 ms at 4x load when only admission, after
  parsing and validation, refused them); every 503 says its server time in `Server-Timing: total`;
- an exception no handler caught answers 500 here and is not re-raised, so the connection stays usable
  (re-raised, the server dropped the keep-alive connection and the client's next request failed);
- every response is counted by endpoint and status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.pipeline.admission import Admission
from service.redact import for_log
from service.settings import Settings

log = logging.getLogger("falconrec.http")

ARRIVAL = "falconrec.arrival"  # ASGI scope key: perf_counter() when the request reached the service
# The path of each /v1 endpoint -> its name in metrics and handlers (the same name over gRPC).
ENDPOINTS = {"/v1/recommend": "recommend", "/v1/score": "score", "/v1/events": "events", "/v1/items": "items"}
API_PATHS = tuple(ENDPOINTS)
RECOMMEND_PATH = "/v1/recommend"  # can degrade to the shortest useful answer, which admission leaves room for
PIPELINE_PATHS = frozenset({RECOMMEND_PATH, "/v1/score"})  # they queue for a pipeline slot (admission)
KNOWN_PATHS = frozenset({*API_PATHS, "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"})


def server_timing_total(arrival: float) -> str:
    return f"total;dur={(time.perf_counter() - arrival) * 1000:.2f}"


def _budget_s(body: bytes, default_ms: float) -> float:
    """The request's own budget_ms when its body names a usable one, else the server's. Validation proper
    comes later (a bad value is a 422 there); this only decides whether the queue can be waited out."""
    try:
        ms = orjson.loads(body).get("budget_ms") if body else None
    except (orjson.JSONDecodeError, AttributeError):
        ms = None
    ok = isinstance(ms, int | float) and not isinstance(ms, bool) and ms > 0
    return (ms if ok else default_ms) / 1000.0


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:  # read as JSON (docs/api.md says so): _read_body adds the header FastAPI needs
        return True
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class _Answered(Exception):
    """Raised inside the guard once it has answered the request itself."""


class GuardMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        metrics: Callable[[], Metrics | None],
        admission: Callable[[], Admission | None] = lambda: None,
    ):
        self.app = app
        self.s = settings
        self.metrics = metrics
        self.admission = admission
        self.inflight = 0
        self.pipeline_inflight = 0  # /v1/recommend and /v1/score past this guard and not yet answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in KNOWN_PATHS else "other"  # bounded label values
        started = False

        async def counted_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
                m = self.metrics()
                if m is not None:
                    m.responses.labels(endpoint, str(msg["status"])).inc()
            await send(msg)

        try:
            if scope["path"].startswith("/v1/"):
                await self._guarded(scope, receive, counted_send, endpoint)
            else:
                await self.app(scope, receive, counted_send)
        except _Answered:
            pass
        except Exception as e:  # noqa: BLE001 - the last line of defence: answer, keep the connection
            log.error("unhandled error on %s: %s", endpoint, for_log(e), exc_info=e)
            if started:
                raise  # half a response went out: only dropping the connection tells the client
            await _reply(counted_send, 500, "internal error")

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, endpoint: str) -> None:
        scope[ARRIVAL] = time.perf_counter()  # the budget counts from here, not from when the handler starts
        # The body first: a request counts against max_concurrency only once it is whole, so slow senders hold
        # no slot (they are answered 408 at body_timeout_s instead).
        body = await self._read_body(scope, receive, send)
        pipeline = endpoint in PIPELINE_PATHS
        why = "overloaded: too many requests in flight" if self.inflight >= self.s.max_concurrency else None
        if why is None and pipeline:
            why = self._queue_too_long(scope[ARRIVAL], body, answer=endpoint == RECOMMEND_PATH)
        if why is not None:
            m = self.metrics()
            if m is not None:  # counted as the handlers count theirs (by endpoint name, both transports)
                name = ENDPOINTS.get(endpoint, endpoint)  # "other": a /v1/ path no route has
                m.shed.labels(name).inc()
                m.answers.labels(name, "http", "503").inc()
            timing = server_timing_total(scope[ARRIVAL])
            await _reply(send, 503, f"{why}, retry shortly", retry_after=True, server_timing=timing)
            return
        self.inflight += 1
        self.pipeline_inflight += pipeline
        try:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: wait for the disconnect, as the server would

            await self.app(scope, replay, send)
        finally:
            self.inflight -= 1
            self.pipeline_inflight -= pipeline

    def _queue_too_long(self, arrival: float, body: bytes, answer: bool) -> str | None:
        """Why the pipeline cannot take this request within its budget, counting the requests that arrived
        before it and are still being parsed (admission sees them only once they reach it), or None."""
        adm = self.admission()
        if adm is None:
            return None
        not_yet_queued = max(0, self.pipeline_inflight - adm.active - adm.waiting)
        remaining = _budget_s(body, self.s.budget_ms) - (time.perf_counter() - arrival)
        return adm.overloaded(remaining, not_yet_queued, answer)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes:
        cap = self.s.max_body_bytes
        headers = dict(scope.get("headers") or [])
        too_large = f"request body over {cap} bytes"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            await _reply(send, 413, too_large, close=True)
            raise _Answered
        body = b""
        if scope["method"] not in ("GET", "HEAD"):
            try:
                async with asyncio.timeout(self.s.body_timeout_s):
                    body = await _receive_body(receive, cap)
            except TimeoutError:
                await _reply(send, 408, f"request body not received within {self.s.body_timeout_s:g} s", close=True)
                raise _Answered from None
            except _TooLarge as e:  # chunked, or a Content-Length that lied: answer, close
                if e.more:
                    await _drain(receive, DRAIN_BYTES_FACTOR * cap, DRAIN_SECONDS)
                await _reply(send, 413, too_large, close=True)
                raise _Answered from None
        content_type = headers.get(b"content-type")
        if body and not _is_json(content_type):
            await _reply(send, 415, "request body must be JSON (content-type: application/json)")
            raise _Answered
        if content_type is None:  # read as JSON, as documented (FastAPI leaves such bytes unparsed: a 422)
            scope["headers"] = [*scope.get("headers", []), (b"content-type", b"application/json")]
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            await _reply(send, 400, f"request body is not valid UTF-8 (byte {e.start}): JSON must be UTF-8")
            raise _Answered from None
        return body


class _TooLarge(Exception):
    def __init__(self, more: bool):
        self.more = more  # the client is still sending


async def _receive_body(receive: Receive, cap: int) -> bytes:
    """The whole body; raises _TooLarge past `cap` bytes, _Answered when the client went away."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _Answered  # nobody to answer
        chunk = msg.get("body", b"")
        more = msg.get("more_body", False)
        size += len(chunk)
        if size > cap:
            raise _TooLarge(more)
        chunks.append(chunk)
    return b"".join(chunks)


DRAIN_BYTES_FACTOR = 4  # read and drop up to this many caps past the cap before answering 413 ...
DRAIN_SECONDS = 2.0  # ... or for this long: a close with unread bytes is a TCP reset, and a client still
# sending then loses the 413 (seen in CI); bounded, as nginx's lingering close, so a huge body costs little


async def _drain(receive: Receive, max_bytes: int, max_s: float) -> None:
    """Read and discard the rest of a body, up to `max_bytes` or `max_s` seconds."""
    deadline = time.monotonic() + max_s
    dropped = 0
    while dropped <= max_bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            msg = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            return
        if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
            return
        dropped += len(msg.get("body", b""))


async def _reply(
    send: Send, status: int, detail: str, retry_after: bool = False, close: bool = False, server_timing: str = ""
) -> None:
    payload = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after:
        headers.append((b"retry-after", b"1"))
    if server_timing:
        headers.append((b"server-timing", server_timing.encode()))
    if close:  # the rest of the body was not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
