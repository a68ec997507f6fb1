"""`falconrec bench-data`: load time and peak memory of the dataset loader (training/dataset_files.py) at scale.

Generates, into a temporary directory, an ML-20M-sized log (20M interactions, 140k users, 27k items; Parquet;
rows shuffled as a real event log is in time order across users, not grouped by user) and a 1M-item catalog with
its own log, then loads each in a fresh process (spawned, so ru_maxrss is the load's own peak and not the
generator's) and writes data.npz as the build does. A benchmark, not a test: minutes and a few GB at full size.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Case:
    name: str
    interactions: int
    users: int
    items: int
    string_ids: bool


def _ids(prefix: str, values: np.ndarray, string_ids: bool) -> pa.Array:
    """Integer ids, or string ids built in Arrow ("SKU-00001234"): 20M Python strings would dominate the run."""
    arr = pa.array(values)
    if not string_ids:
        return arr
    return pc.binary_join_element_wise(prefix, pc.utf8_lpad(arr.cast(pa.string()), 8, "0"), "")


def write_case(c: Case, d: Path, seed: int = 0) -> tuple[Path, Path]:
    """interactions.parquet and items.parquet: ≥ 20 events per user (as ML-20M), Zipf-like item popularity,
    strictly increasing times per user (so no duplicate rows), items 1..N with short texts."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(20, rng.lognormal(0, 1, c.users))
    lengths = np.maximum(20, (lengths * (c.interactions / lengths.sum())).astype(np.int64))
    lengths[np.argmax(lengths)] += c.interactions - lengths.sum()  # the heaviest user absorbs the rounding
    if lengths.min() < 1:
        raise ValueError(f"{c.interactions} interactions are too few for {c.users} users of 20 each")
    users = np.repeat(np.arange(1, c.users + 1, dtype=np.int64), lengths)
    pop = 1.0 / np.arange(1, c.items + 1) ** 0.9
    items = rng.choice(np.arange(1, c.items + 1, dtype=np.int64), size=c.interactions, p=pop / pop.sum())
    gaps = rng.integers(1, 86_400, size=c.interactions)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cum = np.cumsum(gaps)
    times = 1_000_000_000 + cum - np.repeat(cum[starts] - gaps[starts], lengths)
    order = rng.permutation(c.interactions)
    inter = pa.table(
        {
            "user_id": _ids("user-", users[order], c.string_ids),
            "item_id": _ids("SKU-", items[order], c.string_ids),
            "timestamp": times[order],
        }
    )
    del users, items, times, order
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(inter, d / "interactions.parquet")
    ids = np.arange(1, c.items + 1, dtype=np.int64)
    num = pa.array(ids).cast(pa.string())
    text = pc.binary_join_element_wise("Item ", num, " | Category ", pa.array(ids % 97).cast(pa.string()), "")
    pq.write_table(pa.table({"item_id": _ids("SKU-", ids, c.string_ids), "text": text}), d / "items.parquet")
    return d / "interactions.parquet", d / "items.parquet"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(inter: Path, items: Path, out: Path, q) -> None:
    """In a fresh process: import, load, save data.npz, load it back; times and peak RSS of each stage."""
    from training.data import Dataset
    from training.dataset_files import LoadOptions, load_files

    base = _rss_mb()
    t = time.perf_counter()
    ds = load_files(inter, items, LoadOptions(min_user_interactions=3))
    load_s, load_rss = time.perf_counter() - t, _rss_mb()
    t = time.perf_counter()
    ds.save(out)
    save_s = time.perf_counter() - t
    del ds
    t = time.perf_counter()
    back = Dataset.load(out)
    reload_s = time.perf_counter() - t
    q.put(
        {
            "users": back.num_users,
            "items": back.num_items,
            "interactions": int(sum(len(s) for s in back.seqs)),
            "import_rss_mb": base,
            "load_s": load_s,
            "load_peak_rss_mb": load_rss,
            "save_s": save_s,
            "npz_mb": out.stat().st_size / 1e6,
            "npz_load_s": reload_s,
            "peak_rss_mb": _rss_mb(),
        }
    )


def _in_child(target, *args) -> None:
    """Run in a spawned process: the generator's arrays never raise this process's (or the loader's) peak RSS,
    which a child inherits (Linux keeps ru_maxrss across fork and exec)."""
    p = mp.get_context("spawn").Process(target=target, args=args)
    p.start()
    p.join()
    if p.exitcode:
        raise RuntimeError(f"{target.__name__} failed (exit {p.exitcode})")


def run_case(c: Case, root: Path, log=print) -> dict:
    d = root / c.name
    t = time.perf_counter()
    _in_child(write_case, c, d)
    inter, items = d / "interactions.parquet", d / "items.parquet"
    log(f"[{c.name}] wrote {c.interactions:,} interactions, {c.items:,} items in {time.perf_counter() - t:.1f} s")
    q = mp.get_context("spawn").Queue()
    _in_child(_measure, inter, items, d / "data.npz", q)
    row = q.get()
    file_mb = (inter.stat().st_size + items.stat().st_size) / 1e6
    log(f"[{c.name}] loaded in {row['load_s']:.1f} s, peak RSS {row['load_peak_rss_mb']:.0f} MB")
    return {"case": c.name, "ids": "str" if c.string_ids else "int", "parquet_mb": file_mb, **row}


def bench_data(
    interactions: int = 20_000_000,
    users: int = 140_000,
    items: int = 27_000,
    catalog: int = 1_000_000,
    catalog_interactions: int = 5_000_000,
    string_ids: bool = True,
    log=print,
) -> list[dict]:
    """The ML-20M-sized log with integer ids (and with string ids), and the 1M-item catalog with string ids."""
    cases = [Case("log-int", interactions, users, items, False)]
    if string_ids:
        cases.append(Case("log-str", interactions, users, items, True))
    if catalog:
        cases.append(Case("catalog-str", catalog_interactions, max(1, catalog_interactions // 50), catalog, True))
    with tempfile.TemporaryDirectory(prefix="falconrec-bench-data-") as tmp:
        return [run_case(c, Path(tmp), log) for c in cases]
