"""Model versions (issue 25): immutable builds side by side, a *current* pointer the service follows, a gate.

Layout under `FALCONREC_VERSIONS_DIR` (`falconrec models add` writes it):

    versions/
      CURRENT                   the served version's id (one line; written by rename, so never half-written)
      HISTORY                   the ids that were current before, oldest first (what `rollback` goes back to)
      <id>/version.json         id, config, model_version, embedding_version, when, validation metrics
      <id>/artifacts/<config>/  what `falconrec build --artifacts` wrote (data, embeddings, index, checkpoints)
      <id>/model_repository/    what `falconrec build --repo` wrote (the ONNX graphs in Triton's layout)

A version is never changed once written. Every serving process (all `--workers`, every replica) polls the current
pointer and swaps to the version it names (service/swap.py). The pointer is the CURRENT file, or, when Redis is
configured (FALCONREC_REDIS_URL), the Redis key `falconrec:model:current` (with `falconrec:model:history`), so that
replicas on several machines follow one pointer (each still reads the version's files from its versions directory).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CURRENT = "CURRENT"
HISTORY = "HISTORY"
INFO = "version.json"


class VersionError(RuntimeError):
    """A version that does not exist, is incomplete, or may not become current; the message says why."""


@dataclass
class VersionInfo:
    id: str
    config: str
    model_version: str
    embedding_version: str
    created: float
    metrics: dict[str, float] = field(default_factory=dict)  # validation: the ranker's HR@10 and NDCG@10
    note: str = ""
    # A retrain's holdout (each updated user's newest event), scored by this version and by the one it was trained
    # from: {"against": id, "users": n, "candidate": {metric: value}, "current": {metric: value}}.
    holdout: dict = field(default_factory=dict)


REDIS_CURRENT = "falconrec:model:current"
REDIS_HISTORY = "falconrec:model:history"


class VersionStore:
    def __init__(self, root: Path, redis_url: str | None = None):
        self.root = Path(root)
        self.redis = None
        if redis_url:
            import redis  # the sync client: the CLI and the watcher's thread read the pointer

            self.redis = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)

    # --- reading ------------------------------------------------------------------------------------------
    def dir(self, vid: str) -> Path:
        if not vid or "/" in vid or vid.startswith("."):
            raise VersionError(f"not a version id: {vid!r}")
        return self.root / vid

    def artifacts(self, vid: str) -> Path:
        return self.dir(vid) / "artifacts"

    def repository(self, vid: str) -> Path:
        return self.dir(vid) / "model_repository"

    def info(self, vid: str) -> VersionInfo:
        path = self.dir(vid) / INFO
        if not path.is_file():
            raise VersionError(f"no version {vid!r} in {self.root} (no {INFO})")
        return VersionInfo(**json.loads(path.read_text()))

    def ids(self) -> list[str]:
        """Every complete version, oldest first."""
        found = [p.name for p in self.root.iterdir() if (p / INFO).is_file()] if self.root.is_dir() else []
        return sorted(found, key=lambda v: (self.info(v).created, v))

    def current(self) -> str | None:
        if self.redis is not None:
            raw = self.redis.get(REDIS_CURRENT)
            return raw.decode() if raw else None
        try:
            vid = (self.root / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return vid or None

    def history(self) -> list[str]:
        if self.redis is not None:
            raw = self.redis.get(REDIS_HISTORY)
            return json.loads(raw) if raw else []
        try:
            return json.loads((self.root / HISTORY).read_text())
        except FileNotFoundError:
            return []

    def _write_pointer(self, current: str, history: list[str] | None) -> None:
        """CURRENT (and HISTORY when given), as one step: one Redis transaction, or file renames."""
        if self.redis is not None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.set(REDIS_CURRENT, current)
            if history is not None:
                pipe.set(REDIS_HISTORY, json.dumps(history))
            pipe.execute()
            return
        if history is not None:
            _atomic_write(self.root / HISTORY, json.dumps(history))
        _atomic_write(self.root / CURRENT, current + "\n")

    # --- writing ------------------------------------------------------------------------------------------
    def next_id(self) -> str:
        """The next free vN: directories count too, so an interrupted `models add` (no version.json) is skipped."""
        names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        taken = {int(v[1:]) for v in names if v[:1] == "v" and v[1:].isdigit()}
        return f"v{max(taken, default=0) + 1}"

    def write_info(self, info: VersionInfo) -> None:
        _atomic_write(self.dir(info.id) / INFO, json.dumps(asdict(info), indent=2))

    def set_current(self, vid: str, remember: bool = True) -> str | None:
        """Make `vid` current; returns the one it replaced (kept in HISTORY for rollback unless not `remember`)."""
        self.info(vid)  # exists and is complete
        before = self.current()
        if before == vid:
            return before
        remembered = [*self.history(), before] if remember and before is not None else None
        self._write_pointer(vid, remembered)
        return before

    def rollback(self) -> str:
        """Back to the version that was current before this one; returns its id."""
        hist = self.history()
        if not hist:
            raise VersionError("nothing to roll back to: no version was current before this one")
        target = hist[-1]
        self.info(target)
        self._write_pointer(target, hist[:-1])
        return target


def triton_number(version_id: str) -> int:
    """'v3' -> 3: the Triton version a falconrec version is published as (exporters/triton_versions.py) and that
    every request to Triton names while it is served."""
    digits = version_id.removeprefix("v")
    if not digits.isdigit() or int(digits) < 1:
        raise VersionError(f"version id {version_id!r} has no Triton number (expected v1, v2, ...)")
    return int(digits)


HOLDOUT_MIN_USERS = 200  # below this a retrain's holdout is printed and kept, not gated on


def gate(candidate: VersionInfo, current: VersionInfo | None, tolerance: float) -> str | None:
    """Why `candidate` may not replace `current` (a validation metric worse by more than `tolerance`), or None."""
    if current is None:
        return None
    missing = sorted(current.metrics.keys() - candidate.metrics.keys())
    if missing:
        return f"no validation {', '.join(missing)} to compare with {current.id}'s (was its build complete?)"
    worse = _worse(candidate.metrics, current.metrics, tolerance, "validation ")
    h = candidate.holdout
    # The holdout compares the two on the same events, so only against the version it was measured with, and only
    # on enough users: with 40, one user moves HR@10 by 0.025, five times the default tolerance.
    if h.get("against") == current.id and h.get("users", 0) >= HOLDOUT_MIN_USERS:
        worse += _worse(h["candidate"], h["current"], tolerance, f"holdout ({h['users']} users) ")
    if worse:
        return f"worse than {current.id}: " + "; ".join(worse)
    return None


def _worse(cand: dict[str, float], cur: dict[str, float], tolerance: float, what: str) -> list[str]:
    keys = sorted(k for k in cur.keys() & cand.keys() if k != "users")
    return [f"{what}{k} {cand[k]:.4f} < {cur[k]:.4f} - {tolerance:g}" for k in keys if cand[k] < cur[k] - tolerance]


def _atomic_write(path: Path, text: str) -> None:
    """Write by rename: a reader sees the old file or the new one, never a part (other processes poll these)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_text(text)
    os.replace(tmp, path)
