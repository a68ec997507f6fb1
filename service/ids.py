"""The catalog's own ids (issue 24): integers, or strings such as SKUs ("B00X4WHP5E") and user ids ("user-8f2c").

Inside, every id is an int64 "raw id" (arrays, FAISS, the store's keys, the id index): an integer id is its own raw
id, and a string id's raw id is a stable 63-bit hash of its UTF-8 bytes. Every replica, the build, the store loader
and the ingestion worker compute the same raw id without sharing a table, and a new string id (an event or item
the build never saw) needs no coordination. The build fails on a hash collision inside a catalog (at 1M ids the
chance is ~3e-8). Answers give ids back in the catalog's form: the catalog keeps each item's string beside its raw id.

A catalog has one id kind (its manifest says which). A string catalog takes an integer id as its decimal string
(clients written for integer ids keep working); an integer catalog refuses string ids with a 422.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

import numpy as np

IdKind = Literal["int", "str"]
MAX_ID_CHARS = 128  # a string id: 1..128 characters, no control characters
Id = int | str


class IdError(ValueError):
    """An id that this catalog cannot take; the message is safe to show."""


def hash_key(key: str) -> int:
    """The raw id of a string id: blake2b-64 of its UTF-8 bytes, top bit cleared (a non-negative int64)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def check_key(key: str) -> str:
    if not 0 < len(key) <= MAX_ID_CHARS:
        raise IdError(f"string ids are 1 to {MAX_ID_CHARS} characters, got {len(key)}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise IdError("string ids may not contain control characters")
    return key


def raw_id(value: Id, kind: IdKind) -> int:
    """The raw id of one id as a client sent it (bools are refused before this: schemas are strict)."""
    if kind == "int":
        if isinstance(value, str):
            raise IdError("this catalog's ids are integers, got a string")
        return int(value)
    key = str(value) if isinstance(value, int) else check_key(value)
    return hash_key(key)


def raw_ids(values: Iterable[Id], kind: IdKind) -> np.ndarray:
    return np.fromiter((raw_id(v, kind) for v in values), np.int64)


def keys_to_raw(keys: Iterable[str]) -> np.ndarray:
    """Raw ids of a build's string ids; raises IdError naming two ids that collide."""
    keys = list(keys)
    raw = np.fromiter((hash_key(k) for k in keys), np.int64, len(keys))
    uniq, counts = np.unique(raw, return_counts=True)
    if len(uniq) != len(raw):
        i, j = np.flatnonzero(raw == uniq[np.argmax(counts > 1)])[:2]
        if keys[i] == keys[j]:
            raise IdError(f"id {keys[i]!r} appears twice")
        raise IdError(f"string ids {keys[i]!r} and {keys[j]!r} hash to the same raw id; rename one")
    return raw
