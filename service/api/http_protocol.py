"""The HTTP/1.1 connection layer: uvicorn's httptools protocol plus what the ASGI layer cannot see (issue 22).

uvicorn times out idle keep-alive connections only: a connection that sends part of a request head, or a head
and then a trickle of body, was held for ever. Here:

- the request head must arrive within `header_timeout_s` of the connection opening (or of the first byte of a
  later request on it), else 408 and close;
- a body the app answered without reading (a GET route sent a body) must still end within `body_timeout_s`, else
  the connection is closed; bodies the app reads are timed by the guard (service.api.http_guard), which answers
  408 itself;
- at most `max_incomplete_per_client` connections per client address may be stalled part-way through a request
  (for longer than STALLED_AFTER_S); one more pushes out that address's oldest (408 and close). A newcomer is
  never refused, so requests that arrive whole are served beside any number of stalled sockets from the same
  address, and the stalled ones are answered.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

# A request still incomplete this long after it began counts as stalled. Not from the first byte: a client opening
# its pool (40 connections at once from one address) is part-way through 40 requests for a moment, and counting
# those pushed its own requests out.
STALLED_AFTER_S = 1.0


def _timeout_response(detail: str) -> bytes:
    body = orjson.dumps({"detail": detail})
    head = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    )
    return head + body


class IncompleteRequests:
    """Connections part-way through a request, per client address, oldest first."""

    def __init__(self, limit: int):
        self.limit = limit
        self.by_host: dict[str, OrderedDict[ReadDeadlineProtocol, None]] = {}

    def add(self, conn: ReadDeadlineProtocol, host: str) -> ReadDeadlineProtocol | None:
        """Register `conn`; returns the same address's oldest one when that goes over the limit."""
        conns = self.by_host.setdefault(host, OrderedDict())
        conns[conn] = None
        if len(conns) > self.limit:
            return next(iter(conns))
        return None

    def discard(self, conn: ReadDeadlineProtocol, host: str) -> None:
        conns = self.by_host.get(host)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self.by_host[host]

    def count(self) -> int:
        return sum(len(c) for c in self.by_host.values())


class ReadDeadlineProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with read deadlines and the per-address limit (class attributes: see `protocol_for`)."""

    header_timeout_s: float = 5.0
    body_timeout_s: float = 10.0
    incomplete: IncompleteRequests = IncompleteRequests(32)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._stalled: asyncio.TimerHandle | None = None
        self._reading = False
        self._registered = False
        super().connection_made(transport)
        self._begin_request()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begin_request()  # a later request on a kept-alive connection (the first began with the connection)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._arm(self.body_timeout_s, self._body_overdue)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._end_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_request()
        super().connection_lost(exc)

    # --- the deadlines ------------------------------------------------------------------------------------------
    def _host(self) -> str:
        return self.client[0] if self.client else ""

    def _begin_request(self) -> None:
        if self._reading:
            return
        self._reading = True
        self._arm(self.header_timeout_s, self._head_overdue)
        self._stalled = self.loop.call_later(STALLED_AFTER_S, self._register)

    def _register(self) -> None:
        self._stalled = None
        self._registered = True
        oldest = self.incomplete.add(self, self._host())
        if oldest is not None and oldest is not self:
            oldest._expire(f"more than {self.incomplete.limit} incomplete requests from this address")

    def _end_request(self) -> None:
        for handle in (self._timer, self._stalled):
            if handle is not None:
                handle.cancel()
        self._timer = self._stalled = None
        self._reading = False
        if self._registered:
            self._registered = False
            self.incomplete.discard(self, self._host())

    def _arm(self, seconds: float, action: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, action)

    def _head_overdue(self) -> None:
        self._expire(f"request head not received within {self.header_timeout_s:g} s")

    def _body_overdue(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            return  # the app is reading the body: the guard answers 408 at the same deadline
        self._expire(f"request body not received within {self.body_timeout_s:g} s")

    def _expire(self, detail: str) -> None:
        """408 (unless a response has started) and close; an app waiting for the body sees a disconnect."""
        self._end_request()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(_timeout_response(detail))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()


def protocol_for(settings: Settings) -> type[ReadDeadlineProtocol]:
    """The protocol class of one server: its deadlines, and a registry shared by its connections only."""
    attrs = {
        "header_timeout_s": settings.header_timeout_s,
        "body_timeout_s": settings.body_timeout_s,
        "incomplete": IncompleteRequests(settings.max_incomplete_per_client),
    }
    return type("ServerReadDeadlineProtocol", (ReadDeadlineProtocol,), attrs)
