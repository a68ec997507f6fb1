"""Where user histories come from and events go: the store interface and what both stores share (the in-process
store is service.stores.memory, the Redis one service.stores.redis). No content embedding is read on the request
path: the graphs take per-item tokens the build computed (service/pipeline/item_tokens.py).

Redis layout (one place for it; exporters/redis_loader.py writes it):
    falconrec:version            -> the live data version (flipped last, atomically)
    hist:{version}:{user_id}     -> little-endian int64 item ids, then int64 timestamps
    evid:{version}:{user_id}     -> sorted set of the user's recent event_ids (dedup of POST /v1/events)
    items:{version}:log          -> stream of items added live (service.ingest.live: every replica tails it)
    itemjob:{version}:{item_id}  -> digest of the POST /v1/items job that claimed the id (an identical retry is
                                    not queued twice; another text for the id is a 409)
    falconrec:ingest             -> stream of POST /v1/items jobs for the ingestion worker
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

VERSION_KEY = "falconrec:version"


def hist_key(version: str, user_id: int) -> str:
    return f"hist:{version}:{user_id}"


def evid_key(version: str, user_id: int) -> str:
    return f"evid:{version}:{user_id}"


def item_job_key(version: str, item_id: int) -> str:
    return f"itemjob:{version}:{item_id}"


@dataclass(frozen=True)
class Event:
    user_id: int
    item_id: int
    ts: int
    event_id: str | None = None


@dataclass(frozen=True)
class Appended:
    written: int  # events added to histories
    duplicates: int  # events whose event_id was seen before (dropped)
    users: int


def merge_history(
    items: np.ndarray, ts: np.ndarray, new_items: np.ndarray, new_ts: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """The history with events merged in time order (stable: on equal times, older entries first), last `cap`.
    The Redis script (APPEND_LUA) does the same; tests hold the two to it."""
    all_i = np.concatenate([items, new_items]).astype(np.int64)
    all_t = np.concatenate([ts, new_ts]).astype(np.int64)
    order = np.argsort(all_t, kind="stable")
    return all_i[order][-cap:], all_t[order][-cap:]


def pack_history(items: np.ndarray, ts: np.ndarray) -> bytes:
    return items.astype("<i8").tobytes() + ts.astype("<i8").tobytes()


def unpack_history(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    a = np.frombuffer(raw, dtype="<i8")
    n = len(a) // 2
    return a[:n].astype(np.int64), a[n:].astype(np.int64)


class StoreUnavailable(RuntimeError):
    """The store cannot answer now. The message is safe to show: `public_reason`, never the URL.

    `sent`: the command had gone out when it failed (a timeout): a frozen Redis runs it once it resumes, so a write
    that failed this way may have been applied, and only an idempotent retry is safe (issue 22)."""

    def __init__(self, public: str, sent: bool = False):
        super().__init__(public)
        self.public = public
        self.sent = sent


class FeatureStore(ABC):
    name = "abstract"

    @abstractmethod
    async def history(self, user_id: int, timeout_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """(raw item ids, timestamps) oldest first, or None for an unknown user. Raises StoreUnavailable."""

    @abstractmethod
    def status(self) -> dict: ...

    @abstractmethod
    async def append_events(self, events: list[Event], cap: int, dedup_window: int) -> Appended:
        """Append to the users' histories, all at once or not at all; events are in time order per user."""

    @property
    def healthy(self) -> bool:
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass
