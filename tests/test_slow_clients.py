"""Issue 22, point 1, over real sockets against the real uvicorn server: clients that send part of a request and
then nothing hold no admission slot, are answered 408 and closed, and normal requests are served beside them."""

from __future__ import annotations

import socket

import httpx
import pytest

from service.catalog import Catalog
from tests.conftest import RunningServer, server_settings

SLOW_BODY_HEAD = (
    b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
)
PARTIAL_HEAD = b"POST /v1/recommend HTTP/1.1\r\nhost: x\r\ncontent-type: appl"
WAIT_S = 60.0  # generous: how long a test waits for an answer the server owes (never a timing assertion)


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


def _open(port: int, payload: bytes, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        s.sendall(payload)
        socks.append(s)
    return socks


def _silent(s: socket.socket) -> bool:
    """Open, and nothing received yet."""
    s.setblocking(False)
    try:
        s.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        s.setblocking(True)
        s.settimeout(WAIT_S)
    return False


def _answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout here fails the test)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _close(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def _normal_requests(url: str, users: list[int]) -> list[int]:
    with httpx.Client(base_url=url, timeout=WAIT_S) as c:
        return [c.post("/v1/recommend", json={"user_id": u}).status_code for u in users]


def test_slow_bodies_hold_no_slot_and_are_answered_408(tiny_build, catalog):
    """80 sockets (more than the 64 admission slots) send a head and no body: normal requests beside them get 200,
    and each slow socket gets 408 and is closed (before: 503 for every request, the sockets open for ever)."""
    srv = RunningServer(server_settings(tiny_build, grpc_port=0, body_timeout_s=8.0, max_incomplete_per_client=200))
    users = list(catalog.user_histories)[:20]
    slow: list[socket.socket] = []
    try:
        slow = _open(srv.settings.port, SLOW_BODY_HEAD, 80)
        assert _normal_requests(srv.url, users[:1]) == [200]
        assert all(_silent(s) for s in slow)  # that 200 came while all 80 were open and unanswered
        codes = _normal_requests(srv.url, users[1:])
        assert codes == [200] * (len(users) - 1), codes
        for s in slow:
            answer = _answer(s)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"connection: close" in answer.lower() and b"request body not received" in answer
        text = httpx.get(f"{srv.url}/metrics", timeout=WAIT_S).text
        assert 'falconrec_responses_total{endpoint="/v1/recommend",status="408"} 80.0' in text
    finally:
        _close(slow)
        srv.stop()


def test_partial_heads_are_answered_408(tiny_build, catalog):
    """A request head that never ends (slowloris) is answered 408 and closed (it held its connection for ever)."""
    srv = RunningServer(server_settings(tiny_build, grpc_port=0, header_timeout_s=2.0))
    socks: list[socket.socket] = []
    try:
        socks = _open(srv.settings.port, PARTIAL_HEAD, 10) + _open(srv.settings.port, b"", 5)
        assert _normal_requests(srv.url, list(catalog.user_histories)[:3]) == [200] * 3
        for s in socks:
            answer = _answer(s)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"request head not received" in answer, answer[:200]
    finally:
        _close(socks)
        srv.stop()


def test_incomplete_requests_per_address_are_capped_oldest_first(tiny_build, catalog):
    """With the limit at 8, 20 stalled sockets from one address leave the newest 8 open and answer the oldest 12
    408 long before any deadline (600 s here); a normal client from the same address is still served."""
    srv = RunningServer(
        server_settings(
            tiny_build, grpc_port=0, header_timeout_s=600.0, body_timeout_s=600.0, max_incomplete_per_client=8
        )
    )
    socks: list[socket.socket] = []
    try:
        socks = _open(srv.settings.port, SLOW_BODY_HEAD, 20)
        for s in socks[:12]:  # answered within WAIT_S: pushed out, not timed out
            answer = _answer(s)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"incomplete requests" in answer, answer[:200]
        assert all(_silent(s) for s in socks[12:])
        assert _normal_requests(srv.url, list(catalog.user_histories)[:3]) == [200] * 3
    finally:
        _close(socks)
        srv.stop()
