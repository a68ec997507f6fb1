"""Datasets: MovieLens-1M (local dir or verified download) and a synthetic catalog with planted structure. Both are
instances of the dataset format (docs/data.md): ML-1M is converted to it and the synthetic tables are built in it,
and both are read by its one loader, training/dataset_files.py, as a user's own files are.

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
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from training.dataset import Dataset, DatasetError

if TYPE_CHECKING:
    from training.dataset_files import LoadOptions

__all__ = ["Dataset", "DatasetError"]  # their home is training/dataset.py, below the loader; imported from here too

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
ML1M_SHA256 = "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"
ML1M_FILES = ("ratings.dat", "movies.dat")
# Beside the checkout on the team's machines (read-only).
_SHARED_ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"


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


def _read_movies(movies_path: Path) -> tuple[list[int], list[str], list[str]]:
    raw_ids: list[int] = []
    titles: list[str] = []
    genres: list[str] = []
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
            titles.append(parts[1])
            genres.append(parts[2].replace("|", ", "))
    if not raw_ids:
        raise DatasetError(f"{movies_path} holds no movies")
    return raw_ids, titles, genres


def _read_ratings(ratings_path: Path) -> np.ndarray:
    """[n, 4] int64: UserID, MovieID, Rating, Timestamp, in file order."""
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
    return flat.reshape(-1, 4)


def convert_ml1m(data_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """MovieLens-1M's '::' files -> the dataset format (docs/data.md): interactions.parquet (user_id, item_id,
    timestamp in seconds, weight = the rating) in ratings.dat's order, items.parquet (item_id, title, genres)
    in movies.dat's order. Ids stay the MovieLens integers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw_ids, titles, genres = _read_movies(data_dir / "movies.dat")
    arr = _read_ratings(data_dir / "ratings.dat")
    out_dir.mkdir(parents=True, exist_ok=True)
    items = pa.table({"item_id": pa.array(raw_ids, pa.int64()), "title": titles, "genres": genres})
    inter = pa.table({"user_id": arr[:, 0], "item_id": arr[:, 1], "timestamp": arr[:, 3], "weight": arr[:, 2]})
    pq.write_table(items, out_dir / "items.parquet")
    pq.write_table(inter, out_dir / "interactions.parquet")
    return out_dir / "interactions.parquet", out_dir / "items.parquet"


# The config's filters that apply to ML-1M too (the columns, template and units are the converter's).
ML1M_FILTERS = ("on_bad_rows", "min_user_interactions", "min_item_interactions", "min_weight")


def ml1m_options(base: LoadOptions | None = None) -> LoadOptions:
    """The reader settings of the converted files; the filters (k-core, bad-row policy, events) stay the caller's."""
    from training.dataset_files import LoadOptions

    keep = {k: getattr(base, k) for k in ML1M_FILTERS} if base is not None else {}
    fixed = {"text_template": "{title} | {genres}", "time_unit": "s", "item_id_kind": "int", "user_id_kind": "int"}
    return LoadOptions(**fixed, **keep)


def load_ml1m(data_dir: Path | None = None, download: bool = False, options: LoadOptions | None = None) -> Dataset:
    """ML-1M through the one loader: converted to Parquet in a temporary directory, then read like any user's
    files. The report names the .dat files (their line numbers are the Parquet row numbers)."""
    from training.dataset_files import load_tables, read_part

    data_dir = Path(data_dir) if data_dir else default_ml1m_dir()
    if download and not all((data_dir / f).is_file() for f in ML1M_FILES):
        download_ml1m(data_dir)
    _check_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="falconrec-ml1m-") as tmp:
        inter_path, items_path = convert_ml1m(data_dir, Path(tmp))
        inter, items = read_part(inter_path, ()), read_part(items_path, ())
    inter.name, items.name = str(data_dir / "ratings.dat"), str(data_dir / "movies.dat")
    return load_tables("ml1m", [inter], [items], ml1m_options(options))


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
    ds = _load_synthetic(texts, seqs, times)
    ds.meta["clusters"] = cluster_of
    return ds


def _load_synthetic(texts: list[str], seqs: list[np.ndarray], times: list[np.ndarray]) -> Dataset:
    """The generated catalog as the two tables of the format (item ids 1..N, user ids 1..U), through the one
    loader; every generated user is kept (no minimum history: the generator decides the lengths)."""
    import pyarrow as pa

    from training.dataset_files import LoadOptions, Part, load_tables

    lengths = [len(s) for s in seqs]
    inter = pa.table(
        {
            "user_id": np.repeat(np.arange(1, len(seqs) + 1, dtype=np.int64), lengths),
            "item_id": np.concatenate(seqs),
            "timestamp": np.concatenate(times),
        }
    )
    items = pa.table({"item_id": np.arange(1, len(texts) + 1, dtype=np.int64), "text": texts})
    opts = LoadOptions(time_unit="s", min_user_interactions=1)
    return load_tables("synthetic", [Part("synthetic interactions", inter)], [Part("synthetic items", items)], opts)
