"""API keys: `Authorization: Bearer <key>` over HTTP, the same header as gRPC metadata.

Keys come from settings (`api_keys`) and/or a file (`api_keys_file`), each entry `scope[,scope]:secret`.
Only SHA-256 digests are kept; a presented key is compared against every digest with `hmac.compare_digest`
(no early exit, equal lengths), so the time taken says nothing about which key or how much of one matched.
No key, digest or Authorization header is ever logged, put in a metric label or echoed in an answer.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from service.settings import Settings

READ, WRITE, ADMIN = "read", "write", "admin"
SCOPES = frozenset({READ, WRITE, ADMIN})


class AuthError(Exception):
    """401 (no or unknown key) or 403 (a key without the scope). Messages never include the key."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Key:
    digest: bytes
    scopes: frozenset[str]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def parse_entry(entry: str, where: str) -> _Key:
    """`scope[,scope]:secret`. Errors name the entry's position, never its text (it holds the secret)."""
    scopes_text, sep, secret = entry.strip().partition(":")
    scopes = frozenset(s.strip() for s in scopes_text.split(",") if s.strip())
    if not sep or not secret or not scopes:
        raise ValueError(f"API key {where}: expected 'scope[,scope]:secret'")
    unknown = scopes - SCOPES
    if unknown:
        raise ValueError(f"API key {where}: unknown scope(s) {sorted(unknown)}; use {sorted(SCOPES)}")
    if len(secret) < 16:
        raise ValueError(f"API key {where}: the secret is shorter than 16 characters")
    return _Key(_digest(secret), scopes)


class KeyRing:
    def __init__(self, keys: list[_Key], require_read: bool = False):
        self._keys = tuple(keys)
        self.require_read = require_read

    @classmethod
    def from_settings(cls, s: Settings) -> KeyRing:
        keys = [parse_entry(k.get_secret_value(), f"#{i + 1} in api_keys") for i, k in enumerate(s.api_keys)]
        if s.api_keys_file is not None:
            lines = Path(s.api_keys_file).read_text().splitlines()
            for n, line in enumerate(lines, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    keys.append(parse_entry(line, f"on line {n} of api_keys_file"))
        return cls(keys, s.require_read_key)

    def __len__(self) -> int:
        return len(self._keys)

    def scopes(self, presented: str) -> frozenset[str] | None:
        d = _digest(presented)
        found: frozenset[str] | None = None
        for k in self._keys:  # every key, always: no early exit
            if hmac.compare_digest(d, k.digest):
                found = k.scopes
        return found

    def check(self, authorization: str | None, scope: str) -> None:
        """Raise AuthError unless `authorization` (the header's value) carries a key with `scope`."""
        if scope == READ and not self.require_read:
            return
        secret = bearer_token(authorization)
        if secret is None:
            raise AuthError(401, "an API key is required: Authorization: Bearer <key>")
        scopes = self.scopes(secret)
        if scopes is None:
            raise AuthError(401, "unknown API key")
        if scope not in scopes and ADMIN not in scopes:
            raise AuthError(403, f"this API key lacks the '{scope}' scope")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
