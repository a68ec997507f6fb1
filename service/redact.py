"""Nothing secret or internal leaves the service: no credential (in responses or logs), and in responses no
host:port, no internal path and no exception class name.

Responses use `public_reason` (a fixed phrase per kind of failure); logs keep the detail an operator needs
through `for_log` (credentials removed, addresses kept).
"""

from __future__ import annotations

import functools
import re

import redis.exceptions as rx

# scheme://user:password@host -> scheme://***@host (also a bare `:password@`)
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")
_HOST_PORT = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|(?:\d{1,3}\.){3}\d{1,3}|localhost|[\w-]+(?:\.[\w-]+)+):\d{1,5}\b")
_PATH = re.compile(r"(?<![\w/:.])/(?:[\w.+-]+/)+[\w.+-]*")
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S+")


def strip_credentials(text: str) -> str:
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


@functools.lru_cache(maxsize=4096)
def redact(text: str) -> str:
    """For responses: no URL, credential, host:port or filesystem path. Memoised: every degraded answer redacts its
    reasons, and they repeat (four regexes, 9 us a reason, were 2.5 % of the event loop's Python under load)."""
    text = _URL.sub("<url>", strip_credentials(text))
    text = _HOST_PORT.sub("<address>", text)
    return _PATH.sub("<path>", text)


def for_log(e: BaseException) -> str:
    """An exception for a log line: its class and message, credentials removed."""
    return strip_credentials(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def public_reason(e: BaseException) -> str:
    """A fixed phrase for a dependency failure, safe to put in a response."""
    if isinstance(e, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return "authentication failed"
    if isinstance(e, TimeoutError | rx.TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionError | OSError | rx.ConnectionError):
        return "connection failed"
    reason = getattr(e, "public", None)  # our own errors carry a safe phrase
    return reason if isinstance(reason, str) else "error"


def redact_tree(obj: object) -> object:
    """`redact` every string in a JSON-like tree (the /readyz detail)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_tree(v) for v in obj]
    return obj
