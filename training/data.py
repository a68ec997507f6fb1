"""Datasets: MovieLens-1M (local dir or verified download) and a synthetic catalog with planted structure.

Items are re-indexed to 1..N (0 is padding everywhere); every user's interactions are sorted by time.
The split is leave-one-out as in SASRec/HSTU: last item = test, second last = validation. Training reads
everything but the test item, except for the validation users, whose validation item is held out too
(`[data] valid_holdout = "valid_users"`, the reference's way); "all" holds it out for every user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_SHA256 = "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
ML1M_FILES = ("ratings.dat", "movies.dat")
# Beside the checkout on the team's machines (read-only).
_SHARED_ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message says what was expected and where."""


@dataclass
class Dataset:
    """Interactions of every user, time-sorted, with item indices 1..num_items (0 = padding)."""

    name: str
    item_raw_ids: np.ndarray  # [num_items] raw id of item index i+1
    item_texts: list[str]  # [num_items] text fed to the content model
    user_raw_ids: np.ndarray  # [num_users]
    seqs: list[np.ndarray]  # per user: item indices (int64), time-ordered
    times: list[np.ndarray]  # per user: unix seconds (int64), same order
    meta: dict = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.item_raw_ids)

    @property
    def num_users(self) -> int:
        return len(self.seqs)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(self.item_raw_ids.tobytes())
        for s, t in zip(self.seqs, self.times, strict=True):
            h.update(s.tobytes())
            h.update(t.tobytes())
        return h.hexdigest()[:16]

    # --- leave-one-out split -------------------------------------------------------------------
    def train_seq(self, u: int, keep_valid: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Everything except the validation and test items (`keep_valid`: except the test item only)."""
        end = -1 if keep_valid else -2
        return self.seqs[u][:end], self.times[u][:end]

    def valid_example(self, u: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(history items, history times, target item, target time) with the second-last item as target."""
        s, t = self.seqs[u], self.times[u]
        return s[:-2], t[:-2], int(s[-2]), int(t[-2])

    def test_example(self, u: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """History is everything but the last item; the last item is the target."""
        s, t = self.seqs[u], self.times[u]
        return s[:-1], t[:-1], int(s[-1]), int(t[-1])

    # --- persistence (artifacts/, never committed) --------------------------------------------
    def save(self, path: Path) -> None:
        lengths = np.array([len(s) for s in self.seqs], dtype=np.int64)
        np.savez_compressed(
            path,
            name=np.array(self.name),
            item_raw_ids=self.item_raw_ids,
            item_texts=np.array(self.item_texts, dtype=str),
            user_raw_ids=self.user_raw_ids,
            lengths=lengths,
            items=np.concatenate(self.seqs) if self.seqs else np.zeros(0, np.int64),
            times=np.concatenate(self.times) if self.times else np.zeros(0, np.int64),
        )

    @classmethod
    def load(cls, path: Path) -> Dataset:
        z = np.load(path, allow_pickle=False)
        offsets = np.concatenate([[0], np.cumsum(z["lengths"])])
        items, times = z["items"], z["times"]
        seqs = [items[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        ts = [times[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        return cls(
            name=str(z["name"]),
            item_raw_ids=z["item_raw_ids"],
            item_texts=[str(x) for x in z["item_texts"]],
            user_raw_ids=z["user_raw_ids"],
            seqs=seqs,
            times=ts,
        )


# --------------------------------------------------------------------------------------------------
# MovieLens-1M
# --------------------------------------------------------------------------------------------------
def default_ml1m_dir() -> Path:
    env = os.environ.get("FALCONREC_DATA_DIR")
    if env:
        return Path(env)
    if _SHARED_ML1M.is_dir():
        return _SHARED_ML1M
    return Path("artifacts/download/ml-1m")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_ml1m(dest: Path, url: str = ML1M_URL, sha256: str = ML1M_SHA256) -> Path:
    """Download the GroupLens zip, verify its SHA-256, and extract `ml-1m/` into `dest`'s parent.

    `url` may be a file:// URL (tests use one; there is no internet on the build machines).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        zpath = Path(tmp) / "ml-1m.zip"
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(zpath, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise DatasetError(f"could not download MovieLens-1M from {url}: {e}") from e
        got = sha256_file(zpath)
        if got != sha256:
            raise DatasetError(
                f"MovieLens-1M download from {url} has SHA-256 {got}, expected {sha256}; refusing to use it"
            )
        with zipfile.ZipFile(zpath) as z:
            names = z.namelist()
            for want in ML1M_FILES:
                if f"ml-1m/{want}" not in names:
                    raise DatasetError(f"zip from {url} lacks ml-1m/{want}")
            extract = Path(tmp) / "x"
            z.extractall(extract)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(extract / "ml-1m"), dest)
    return dest


def _check_dir(data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise DatasetError(
            f"MovieLens-1M directory {data_dir} does not exist; expected ratings.dat and movies.dat there. "
            "Set FALCONREC_DATA_DIR or pass --data-dir, or use --download."
        )
    missing = [f for f in ML1M_FILES if not (data_dir / f).is_file()]
    if missing:
        raise DatasetError(
            f"MovieLens-1M directory {data_dir} lacks {', '.join(missing)}; "
            f"expected {', '.join(ML1M_FILES)} in the GroupLens '::'-separated format."
        )


def load_ml1m(data_dir: Path | None = None, download: bool = False) -> Dataset:
    data_dir = Path(data_dir) if data_dir else default_ml1m_dir()
    if download and not all((data_dir / f).is_file() for f in ML1M_FILES):
        download_ml1m(data_dir)
    _check_dir(data_dir)

    movies_path = data_dir / "movies.dat"
    raw_ids: list[int] = []
    texts: list[str] = []
    with open(movies_path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("::")
            if len(parts) != 3 or not parts[0].isdigit():
                raise DatasetError(
                    f"{movies_path}:{lineno}: expected 'MovieID::Title (Year)::Genre|Genre', got {line[:80]!r}"
                )
            raw_ids.append(int(parts[0]))
            texts.append(f"{parts[1]} | {parts[2].replace('|', ', ')}")
    if not raw_ids:
        raise DatasetError(f"{movies_path} holds no movies")
    id_to_idx = {r: i + 1 for i, r in enumerate(raw_ids)}

    ratings_path = data_dir / "ratings.dat"
    raw = ratings_path.read_bytes()
    lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
    try:
        flat = np.array(raw.replace(b"::", b" ").split(), dtype=np.int64)
    except ValueError as e:
        raise DatasetError(
            f"{ratings_path}: expected lines 'UserID::MovieID::Rating::Timestamp' of integers ({e})"
        ) from e
    if flat.size == 0 or flat.size != 4 * lines:
        raise DatasetError(
            f"{ratings_path}: expected {lines} lines of 4 '::'-separated integers "
            "(UserID::MovieID::Rating::Timestamp), found a different field count"
        )
    arr = flat.reshape(-1, 4)
    users, movies, times = arr[:, 0], arr[:, 1], arr[:, 3]
    unknown = set(np.unique(movies).tolist()) - id_to_idx.keys()
    if unknown:
        raise DatasetError(f"{ratings_path} rates {len(unknown)} movie ids missing from movies.dat")
    lut = np.zeros(max(raw_ids) + 1, dtype=np.int64)
    lut[list(id_to_idx)] = list(id_to_idx.values())
    items = lut[movies]
    # Stable sort by (user, time) keeps file order for equal timestamps, as SASRec's preprocessing does.
    order = np.lexsort((times, users))
    users, items, times = users[order], items[order], times[order]
    uniq, starts = np.unique(users, return_index=True)
    ends = np.append(starts[1:], len(users))
    seqs = [items[a:b] for a, b in zip(starts, ends, strict=True)]
    ts = [times[a:b] for a, b in zip(starts, ends, strict=True)]
    return Dataset("ml1m", np.array(raw_ids, np.int64), texts, uniq.astype(np.int64), seqs, ts)


# --------------------------------------------------------------------------------------------------
# Synthetic: planted clusters, so a model that learns anything beats popularity.
# --------------------------------------------------------------------------------------------------
_GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Animation"]
_WORDS = ["Star", "Night", "Love", "Dark", "City", "Ghost", "Road", "Sun", "Blood", "Dream", "Iron", "Sea"]


def make_synthetic(
    num_users: int = 300,
    num_items: int = 400,
    num_clusters: int = 8,
    min_len: int = 8,
    max_len: int = 40,
    seed: int = 0,
) -> Dataset:
    """Users walk mostly inside one taste cluster, and items of a cluster share a genre in their text.

    The next item is usually the successor of the previous one within the cluster, so sequence models
    can learn order; the text carries the cluster, so content embeddings help with cold items.
    """
    rng = np.random.default_rng(seed)
    cluster_of = rng.integers(0, num_clusters, size=num_items)
    members = [np.flatnonzero(cluster_of == c) for c in range(num_clusters)]
    texts = [
        f"{_WORDS[i % len(_WORDS)]} {_WORDS[(i // len(_WORDS)) % len(_WORDS)]} {i} ({1950 + i % 70})"
        f" | {_GENRES[cluster_of[i] % len(_GENRES)]}"
        for i in range(num_items)
    ]
    seqs, times = [], []
    for _ in range(num_users):
        c = int(rng.integers(num_clusters))
        m = members[c] if len(members[c]) else np.arange(num_items)
        n = int(rng.integers(min_len, max_len + 1))
        pos = int(rng.integers(len(m)))
        s = np.empty(n, np.int64)
        for j in range(n):
            r = rng.random()
            if r < 0.7:
                pos = (pos + 1) % len(m)
                s[j] = m[pos]
            elif r < 0.9:
                s[j] = m[rng.integers(len(m))]
            else:
                s[j] = rng.integers(num_items)
        seqs.append(s + 1)
        t0 = 946_684_800 + int(rng.integers(0, 10**7))
        times.append(t0 + np.cumsum(rng.integers(30, 86_400, size=n)).astype(np.int64))
    return Dataset(
        "synthetic",
        np.arange(1, num_items + 1, dtype=np.int64),
        texts,
        np.arange(1, num_users + 1, dtype=np.int64),
        seqs,
        times,
        meta={"clusters": cluster_of},
    )
