"""The dataset format (docs/data.md) and its one loader: an interactions table and an items table, from Parquet,
CSV/TSV or JSON Lines (gzip/zstd/bz2 too), read with pyarrow, into a Dataset.

MovieLens-1M and the synthetic catalog come through here as well (training/data.py converts them to the format):
whatever a build trains on was read, checked and ordered by the same code.

Everything stays columnar: ids, codes, times and masks are arrays over all rows; the only per-row Python work is
for rows that are reported (the first few of each reason) and for ISO timestamps in a chunk that pyarrow refuses.
Bad data is never dropped silently: every dropped row is counted under one reason (the first that applies) and the
first few are shown with file, row and column; `on_bad_rows = "fail"` turns any bad row into a DatasetError that
carries the report. Filters the config asks for (event types, minimum weight, k-core) are reported the same way,
but do not fail a build: they are what was asked.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from service.ids import MAX_ID_CHARS, keys_to_raw
from training.dataset import Dataset, DatasetError
from training.text_template import template_fields

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
FORMATS |= {".jsonl": "json", ".ndjson": "json", ".json": "json"}
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".lz4")
EXAMPLES = 5  # rows shown per reason
# Integer seconds above this are past year 5000: such a column is milliseconds (`time_unit = "auto"`).
MS_ABOVE = 10**11
# A CSV field is an integer id when it is written the canonical way: no sign but '-', no leading zero, at most
# 18 digits (always inside int64). "00123" stays a string: it is a SKU, not the number 123.
_CANONICAL_INT = r"^-?(0|[1-9][0-9]{0,17})$"
_ISO = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}:?\d{2})?$"
_ISO_ZONE = r"(Z|[+-]\d{2}:?\d{2})$"
_CONTROL = "[\\x00-\\x1f\\x7f]"

# Reasons a row is bad (subject to on_bad_rows) and reasons it was filtered out by the config (never fatal).
BAD = {
    "missing": "a required field is empty",
    "bad_value": "a field cannot be parsed (id, timestamp or weight)",
    "no_text": "the item has no text",
    "duplicate_item": "the item_id appeared on an earlier row (the first row is kept)",
    "unknown_item": "the item_id is not in the items table (or its row there was dropped)",
    "duplicate_row": "same user, item, timestamp (and event) as an earlier row (the first is kept)",
}
FILTERED = {
    "event_filtered": "event not in keep_events",
    "below_min_weight": "weight below min_weight",
    "user_min_interactions": "user below min_user_interactions (k-core)",
    "item_min_interactions": "item below min_item_interactions (k-core)",
}


@dataclass(frozen=True)
class LoadOptions:
    """How to read the two tables; [data] in a build config maps onto this (training/config.py)."""

    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    event_col: str = "event"  # optional column
    weight_col: str = "weight"  # optional column
    text_col: str = "text"
    title_col: str = "title"  # optional column
    text_template: str = ""  # e.g. "{title} | {genres}": composes the text from item columns (wins over text_col)
    time_unit: str = "auto"  # integer timestamps: "s" | "ms" | "auto" (ms when any is >= MS_ABOVE)
    on_bad_rows: str = "fail"  # "fail" | "skip"
    min_user_interactions: int = 3  # leave-one-out needs a test, a validation and one history item
    min_item_interactions: int = 0  # > 0 also drops items nobody interacted with
    item_id_kind: str = "auto"  # "auto" | "int" | "str"
    user_id_kind: str = "auto"
    keep_events: tuple[str, ...] = ()  # empty: every event type
    min_weight: float | None = None

    def template_fields(self) -> list[str]:
        return template_fields(self.text_template)


@dataclass
class Part:
    """One file of a table (or a table built in memory): the name the report shows, and whether its ids are
    typed (Parquet, JSON) or text that is an integer only when every value is written as one (CSV/TSV)."""

    name: str
    table: pa.Table
    typed: bool = True


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclass
class Example:
    file: str
    row: int  # 1-based record number in its file, header excluded
    column: str
    value: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row} column {self.column} = {self.value}"


@dataclass
class Reason:
    table: str
    name: str
    count: int = 0
    examples: list[Example] = field(default_factory=list)

    @property
    def bad(self) -> bool:
        return self.name in BAD

    @property
    def description(self) -> str:
        return BAD.get(self.name) or FILTERED[self.name]


@dataclass
class LoadReport:
    """What the loader read, kept and dropped, and why; `summary()` is what the build prints."""

    interactions_files: list[str] = field(default_factory=list)
    items_files: list[str] = field(default_factory=list)
    interactions_read: int = 0
    items_read: int = 0
    users_seen: int = 0
    interactions_kept: int = 0
    items_kept: int = 0
    users_kept: int = 0
    item_id_kind: str = "int"
    user_id_kind: str = "int"
    kind_notes: list[str] = field(default_factory=list)  # why a kind is "str" (the first value that is no integer)
    time_unit: str = "s"
    reasons: dict[tuple[str, str], Reason] = field(default_factory=dict)

    def reason(self, table: str, name: str) -> Reason:
        return self.reasons.setdefault((table, name), Reason(table, name))

    @property
    def bad_rows(self) -> int:
        return sum(r.count for r in self.reasons.values() if r.bad)

    def summary(self) -> str:
        lines = [
            f"interactions: {self.interactions_read:,} read, {self.interactions_kept:,} kept, "
            f"{self.interactions_read - self.interactions_kept:,} dropped ({', '.join(self.interactions_files)})",
            f"items: {self.items_read:,} read, {self.items_kept:,} kept, {self.items_read - self.items_kept:,} "
            f"dropped ({', '.join(self.items_files)})",
            f"users: {self.users_seen:,} seen, {self.users_kept:,} kept, {self.users_seen - self.users_kept:,} dropped",
            f"ids: items {self.item_id_kind}, users {self.user_id_kind}; integer timestamps in {self.time_unit}",
            *self.kind_notes,
        ]
        for r in sorted(self.reasons.values(), key=lambda r: (not r.bad, r.table, r.name)):
            if r.count:
                kind = "bad" if r.bad else "filtered"
                lines.append(f"  {r.table} {kind} {r.name}: {r.count:,} ({r.description})")
                lines += [f"    {e}" for e in r.examples]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "interactions": {"read": self.interactions_read, "kept": self.interactions_kept},
            "items": {"read": self.items_read, "kept": self.items_kept},
            "users": {"seen": self.users_seen, "kept": self.users_kept},
            "id_kinds": {"item": self.item_id_kind, "user": self.user_id_kind},
            "dropped": {f"{r.table}.{r.name}": r.count for r in self.reasons.values() if r.count},
        }


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------
def file_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise DatasetError(
            f"{path}: unknown file kind; name it .parquet, .csv, .tsv or .jsonl (optionally + .gz/.zst/.bz2)"
        )
    if fmt == "parquet" and path.suffix.lower() in COMPRESSIONS:
        raise DatasetError(f"{path}: Parquet compresses inside the file; do not wrap it in {path.suffix}")
    return fmt


def expand_paths(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """A file, a directory (its files of known kinds, by name) or a list of those."""
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    out: list[Path] = []
    for s in specs:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith((".", "_")))
            if not found:
                raise DatasetError(f"{p}: directory holds no data files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DatasetError(f"{p} does not exist")
    return out


def read_part(path: Path, text_cols: Sequence[str]) -> Part:
    """Read one file. CSV/TSV read `text_cols` (ids, text) as strings: type inference would turn "00123" into 123."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return Part(str(path), pq.read_table(path))
        with pa.input_stream(str(path), compression="detect") as f:
            if fmt == "json":
                return Part(str(path), pajson.read_json(f))
            parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
            convert = pacsv.ConvertOptions(column_types=dict.fromkeys(text_cols, pa.string()), strings_can_be_null=True)
            return Part(str(path), pacsv.read_csv(f, parse_options=parse, convert_options=convert), typed=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        hint = " (in JSON Lines an id column must be all numbers or all strings)" if fmt == "json" else ""
        raise DatasetError(f"{path}: cannot read it as {fmt}: {e}{hint}") from e


def read_parts(spec: str | Path | Sequence[str | Path], text_cols: Sequence[str]) -> list[Part]:
    return [read_part(p, text_cols) for p in expand_paths(spec)]


def load_files(
    interactions: str | Path | Sequence[str | Path],
    items: str | Path | Sequence[str | Path],
    opts: LoadOptions = LoadOptions(),
    name: str | None = None,
) -> Dataset:
    """Read the two tables from files and load them (`name` defaults to the interactions file's stem)."""
    inter_text = [opts.user_col, opts.item_col, opts.event_col]
    item_text = [opts.item_col, opts.text_col, opts.title_col]
    inter_parts = read_parts(interactions, inter_text)
    item_parts = read_parts(items, item_text)
    return load_tables(name or Path(inter_parts[0].name).name.split(".")[0], inter_parts, item_parts, opts)


# --------------------------------------------------------------------------------------------------
# One logical table over its parts
# --------------------------------------------------------------------------------------------------
class _Table:
    def __init__(self, label: str, parts: list[Part]):
        if not parts:
            raise DatasetError(f"no {label} files")
        self.label, self.parts = label, parts
        sizes = [p.table.num_rows for p in parts]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.starts[-1])

    def has(self, col: str) -> bool:
        return any(col in p.table.column_names for p in self.parts)

    def require(self, cols: Sequence[str]) -> None:
        for p in self.parts:
            missing = [c for c in cols if c not in p.table.column_names]
            if missing:
                raise DatasetError(
                    f"{p.name}: {self.label} table lacks column(s) {', '.join(missing)}; it has "
                    f"{', '.join(p.table.column_names)} (column names are set in [data] of the build config)"
                )

    def column(self, col: str) -> list[pa.Array]:
        """The column in each part, one array each; all-null where a part lacks an optional column."""
        out = []
        for p in self.parts:
            if col in p.table.column_names:
                out.append(p.table.column(col).combine_chunks())
            else:
                out.append(pa.nulls(p.table.num_rows))
        return out

    def where(self, row: int) -> tuple[str, int]:
        i = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.parts[i].name, row - int(self.starts[i]) + 1

    def shown(self, col: str) -> Callable[[int], str]:
        """A row's value as read, for the report: looked up when shown, so no column is copied for it."""

        def show(row: int) -> str:
            i = int(np.searchsorted(self.starts, row, side="right")) - 1
            table = self.parts[i].table
            v = table.column(col)[row - int(self.starts[i])].as_py() if col in table.column_names else None
            return "(empty)" if v is None else repr(v)[:60]

        return show

    def nulls(self, col: str) -> np.ndarray:
        return np.concatenate([_is_null(a) for a in self.column(col)])


# What a report example shows of a row: nothing (an empty field), a column's value, or a function of the row.
Shown = pa.Array | np.ndarray | Callable[[int], str] | None


class _Flags:
    """Which rows of a table are dropped so far; each newly dropped row is counted under one reason."""

    def __init__(self, table: _Table, report: LoadReport):
        self.table, self.report = table, report
        self.dropped = np.zeros(table.n, bool)

    def flag(self, reason: str, mask: np.ndarray, column: str, values: Shown = None) -> None:
        new = mask & ~self.dropped
        self.dropped |= new
        r = self.report.reason(self.table.label, reason)
        r.count += int(new.sum())
        for row in np.flatnonzero(new)[: EXAMPLES - len(r.examples)].tolist():
            r.examples.append(Example(*self.table.where(row), column, _show(values, row)))


def _show(values: Shown, row: int) -> str:
    if values is None:
        return "(empty)"
    if callable(values):
        return values(row)
    v = values[row].as_py() if isinstance(values, pa.Array) else values[row]
    return "(empty)" if v is None else repr(v)[:60]


def _is_null(arr: pa.Array) -> np.ndarray:
    return arr.is_null().to_numpy(zero_copy_only=False)


def _matches(arr: pa.Array, pattern: str) -> np.ndarray:
    """Regex match per row of a string array; null -> False."""
    return pc.match_substring_regex(arr, pattern).fill_null(False).to_numpy(zero_copy_only=False)


def _cat(arrays: list[pa.Array], typ: pa.DataType) -> pa.Array:
    return pa.concat_arrays([a.cast(typ) for a in arrays]) if arrays else pa.array([], typ)


# --------------------------------------------------------------------------------------------------
# Ids
# --------------------------------------------------------------------------------------------------
def _first_non_int(arr: pa.Array, typed: bool) -> object | None:
    """A value showing this column is no integer column, or None if it is one."""
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_null(t):
        return None
    if pa.types.is_floating(t):
        v = arr.to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(np.isfinite(v) & (v != np.floor(v)))
        return None if not len(bad) else v[bad[0]]
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        if typed:  # a JSON/Parquet string column is a string column, even "123"
            nonnull = arr.drop_null()
            return nonnull[0].as_py() if len(nonnull) else None
        bad = np.flatnonzero(~_matches(arr, _CANONICAL_INT) & ~_is_null(arr))
        return None if not len(bad) else arr[int(bad[0])].as_py()
    return f"<{t}>"


def decide_kind(columns: list[tuple[_Table, str]], forced: str, notes: list[str]) -> str:
    """One id kind for an entity over every column naming it: "int" iff every value in them is an integer."""
    if forced in ("int", "str"):
        return forced
    for table, col in columns:
        for part, arr in zip(table.parts, table.column(col), strict=True):
            v = _first_non_int(arr, part.typed)
            if v is not None:
                notes.append(f"{col} is a string id: {part.name} has {v!r} ({table.label}), not an integer")
                return "str"
    return "int"


def _int_ids(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Integer ids as int64 (bad -> null) and the bad mask: negative, fractional or not written as an integer."""
    n = len(arr)
    if pa.types.is_integer(arr.type) or pa.types.is_null(arr.type):
        if pa.types.is_uint64(arr.type):  # values past int64 are bad, not wrapped
            big = pc.greater(arr, pa.scalar(2**63 - 1, pa.uint64())).fill_null(False).to_numpy(zero_copy_only=False)
            arr = pc.if_else(big, pa.nulls(n, pa.uint64()), arr)
            vals = arr.cast(pa.int64())
            neg = big
        else:
            vals = arr.cast(pa.int64())
            neg = pc.less(vals, 0).fill_null(False).to_numpy(zero_copy_only=False)
    elif pa.types.is_floating(arr.type):
        v = arr.to_numpy(zero_copy_only=False)
        ok = np.isfinite(v) & (v == np.floor(v)) & (v >= 0) & (v < 2**63)
        neg = ~ok & ~np.isnan(v)
        vals = pa.array(np.where(ok, v, 0).astype(np.int64), mask=~ok)
    else:
        s = arr.cast(pa.string())
        ok = _matches(s, _CANONICAL_INT)
        neg = ~ok & ~_is_null(s)
        vals = pc.if_else(pa.array(ok), s, pa.nulls(n, pa.string())).cast(pa.int64())
        neg |= pc.less(vals, 0).fill_null(False).to_numpy(zero_copy_only=False)
    return pc.if_else(pa.array(neg), pa.nulls(n, pa.int64()), vals), neg


def _str_ids(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """String ids (integers as their decimal string; bad -> null) and the bad mask: longer than MAX_ID_CHARS or
    holding control characters. An empty string counts as missing, as in CSV."""
    n = len(arr)
    if pa.types.is_floating(arr.type):
        arr = _int_ids(arr)[0]  # 7.0 -> "7" (the kind check let only integral floats through)
    s = arr.cast(pa.string())
    s = pc.if_else(pc.equal(s, "").fill_null(False), pa.nulls(n, pa.string()), s)
    long = pc.greater(pc.utf8_length(s), MAX_ID_CHARS).fill_null(False).to_numpy(zero_copy_only=False)
    bad = long | _matches(s, _CONTROL)
    return pc.if_else(pa.array(bad), pa.nulls(n, pa.string()), s), bad


def _ids(table: _Table, col: str, kind: str) -> tuple[pa.Array, np.ndarray]:
    """(normalised ids with null for missing or bad, bad mask)."""
    fn = _int_ids if kind == "int" else _str_ids
    done = [fn(a) for a in table.column(col)]
    typ = pa.int64() if kind == "int" else pa.string()
    return _cat([d[0] for d in done], typ), np.concatenate([d[1] for d in done])


# --------------------------------------------------------------------------------------------------
# Timestamps and numbers
# --------------------------------------------------------------------------------------------------
def _cast_seconds(strings: pa.Array, typ: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """ISO strings -> unix seconds (floor) in chunks; a chunk pyarrow refuses is retried value by value."""
    out = np.zeros(len(strings), np.int64)
    bad = np.zeros(len(strings), bool)
    step = 1 << 16
    for a in range(0, len(strings), step):
        chunk = strings[a : a + step]
        try:
            out[a : a + len(chunk)] = chunk.cast(typ).cast(pa.int64()).to_numpy(zero_copy_only=False) // 10**9
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for i in range(len(chunk)):
                try:
                    out[a + i] = pa.array([chunk[i].as_py()]).cast(typ).cast(pa.int64())[0].as_py() // 10**9
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    bad[a + i] = True
    return out, bad


def _iso_seconds(s: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    ok = _matches(s, _ISO)
    zoned = ok & _matches(s, _ISO_ZONE)
    out = np.zeros(len(s), np.int64)
    bad = ~ok
    # Without a zone offset a time is UTC; with one it is converted to UTC.
    for mask, typ in ((ok & ~zoned, pa.timestamp("ns")), (zoned, pa.timestamp("ns", "UTC"))):
        idx = np.flatnonzero(mask)
        if len(idx):
            secs, failed = _cast_seconds(s.take(pa.array(idx)), typ)
            out[idx] = secs
            bad[idx[failed]] = True
    return out, bad


def _time_part(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, is a raw integer (its unit decided later), bad) for one part's timestamp column."""
    n, t = len(arr), arr.type
    zeros = np.zeros(n, bool)
    if pa.types.is_integer(t) or pa.types.is_null(t):
        return arr.cast(pa.int64()).fill_null(0).to_numpy(), ~_is_null(arr), zeros
    if pa.types.is_floating(t):
        v = arr.fill_null(0).to_numpy(zero_copy_only=False)
        ok = np.isfinite(v) & (np.abs(v) < 2**62)
        return np.where(ok, np.floor(v), 0).astype(np.int64), ok & ~_is_null(arr), ~ok
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        if pa.types.is_date32(t):
            return arr.cast(pa.int32()).fill_null(0).to_numpy().astype(np.int64) * 86_400, zeros, zeros
        per_s = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[getattr(t, "unit", "ms")]
        return arr.cast(pa.int64()).fill_null(0).to_numpy() // per_s, zeros, zeros
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        s = arr.cast(pa.string())
        is_int = _matches(s, _CANONICAL_INT)
        ints = pc.if_else(pa.array(is_int), s, "0").cast(pa.int64()).fill_null(0).to_numpy()
        iso, iso_bad = _iso_seconds(pc.if_else(pa.array(is_int), pa.nulls(n, pa.string()), s))
        return np.where(is_int, ints, iso), is_int, iso_bad & ~is_int & ~_is_null(s)
    return np.zeros(n, np.int64), zeros, ~_is_null(arr)


def _timestamps(table: _Table, col: str, unit: str, report: LoadReport) -> tuple[np.ndarray, np.ndarray]:
    parts = [_time_part(a) for a in table.column(col)]
    vals = np.concatenate([p[0] for p in parts])
    raw_int = np.concatenate([p[1] for p in parts])
    bad = np.concatenate([p[2] for p in parts])
    if unit == "auto":
        unit = "ms" if raw_int.any() and int(vals[raw_int].max()) >= MS_ABOVE else "s"
    report.time_unit = unit
    if unit == "ms":
        vals = np.where(raw_int, vals // 1000, vals)
    return vals, bad | (vals < 0)  # the API takes unix seconds >= 0


def _floats(arrays: list[pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """Numeric column as float64 (NaN where empty) and the mask of values that are no number."""
    vals, bad = [], []
    for a in arrays:
        if pa.types.is_string(a.type) or pa.types.is_large_string(a.type):
            ok = _matches(a, r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")
            bad.append(~ok & ~_is_null(a))
            a = pc.if_else(pa.array(ok), pc.utf8_trim_whitespace(a), pa.nulls(len(a), pa.string()))
        elif not (pa.types.is_integer(a.type) or pa.types.is_floating(a.type) or pa.types.is_null(a.type)):
            bad.append(~_is_null(a))
            a = pa.nulls(len(a))
        else:
            bad.append(np.zeros(len(a), bool))
        vals.append(a.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False))
    return np.concatenate(vals), np.concatenate(bad)


# --------------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------------
@dataclass
class _Catalog:
    keys: pa.Array  # ids of the items kept, in file order (int64 or string)
    texts: pa.Array
    titles: pa.Array | None
    rows: np.ndarray  # their rows in the items table


def _as_text(a: pa.Array) -> pa.Array:
    if pa.types.is_list(a.type) or pa.types.is_large_list(a.type):  # ["Comedy", "Drama"] -> "Comedy, Drama"
        return pc.binary_join(a.cast(pa.list_(pa.string())), ", ")
    return a.cast(pa.string())


def _blank(a: pa.Array) -> np.ndarray:
    return pc.equal(pc.utf8_trim_whitespace(a), "").fill_null(True).to_numpy(zero_copy_only=False)


def _item_texts(t: _Table, opts: LoadOptions) -> tuple[pa.Array, np.ndarray, str]:
    """(text per row, rows without text, the column(s) it came from). With a template, a null field composes as
    empty and an item has no text when every field the template names is empty."""
    if not opts.text_template:
        text = _cat([_as_text(a) for a in t.column(opts.text_col)], pa.string())
        return text, _blank(text), opts.text_col
    pieces: list[pa.Array | pa.Scalar] = []
    empty = np.ones(t.n, bool)
    for literal, name, _, _ in string.Formatter().parse(opts.text_template):
        if literal:
            pieces.append(pa.scalar(literal))
        if name is not None:
            col = _cat([_as_text(a) for a in t.column(name)], pa.string())
            empty &= _blank(col)
            pieces.append(col)
    text = pc.binary_join_element_wise(*pieces, "", null_handling="replace", null_replacement="")
    return text, empty, ",".join(opts.template_fields())


def _read_items(t: _Table, opts: LoadOptions, kind: str, report: LoadReport) -> tuple[_Catalog, _Flags]:
    fl = _Flags(t, report)
    ids, bad = _ids(t, opts.item_col, kind)
    raw = t.shown(opts.item_col)
    fl.flag("missing", _is_null(ids) & ~bad, opts.item_col)
    fl.flag("bad_value", bad, opts.item_col, raw)
    text, empty, text_cols = _item_texts(t, opts)
    fl.flag("no_text", empty, text_cols, text)
    live = np.flatnonzero(~fl.dropped)
    codes = pc.index_in(ids.take(pa.array(live)), value_set=ids.drop_null().unique()).to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    dup = np.ones(len(live), bool)
    dup[first] = False
    mask = np.zeros(t.n, bool)
    mask[live[dup]] = True
    fl.flag("duplicate_item", mask, opts.item_col, raw)
    rows = np.flatnonzero(~fl.dropped)
    take = pa.array(rows)
    titles = None
    if t.has(opts.title_col):
        titles = _cat([_as_text(a) for a in t.column(opts.title_col)], pa.string()).take(take)
    return _Catalog(ids.take(take), text.take(take), titles, rows), fl


# --------------------------------------------------------------------------------------------------
# Interactions
# --------------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    users: pa.Array  # normalised user ids (null: dropped)
    user_raw: Callable[[int], str]  # a row's ids as read, for the report
    item_raw: Callable[[int], str]
    item_code: np.ndarray  # index into the catalog, -1: none
    times: np.ndarray  # unix seconds
    event_code: np.ndarray | None


def _check_interactions(t: _Table, opts: LoadOptions, kinds: tuple[str, str], cat: _Catalog, fl: _Flags) -> _Rows:
    item_kind, user_kind = kinds
    users, ubad = _ids(t, opts.user_col, user_kind)
    items, ibad = _ids(t, opts.item_col, item_kind)
    times, tbad = _timestamps(t, opts.time_col, opts.time_unit, fl.report)
    uraw, iraw, traw = t.shown(opts.user_col), t.shown(opts.item_col), t.shown(opts.time_col)
    for col, vals, bad in ((opts.user_col, users, ubad), (opts.item_col, items, ibad)):
        fl.flag("missing", _is_null(vals) & ~bad, col)
    fl.flag("missing", t.nulls(opts.time_col), opts.time_col)
    fl.flag("bad_value", ubad, opts.user_col, uraw)
    fl.flag("bad_value", ibad, opts.item_col, iraw)
    fl.flag("bad_value", tbad, opts.time_col, traw)
    weights = None
    if t.has(opts.weight_col):
        weights, wbad = _floats(t.column(opts.weight_col))
        fl.flag("bad_value", wbad, opts.weight_col, t.shown(opts.weight_col))
    code = pc.index_in(items, value_set=cat.keys).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    fl.flag("unknown_item", code < 0, opts.item_col, iraw)
    fl.report.users_seen = len(users.filter(pa.array(~fl.dropped)).unique())
    event_code = None
    if t.has(opts.event_col):
        events = _cat([_as_text(a) for a in t.column(opts.event_col)], pa.string())
        event_code = pc.index_in(events, value_set=events.drop_null().unique()).fill_null(-1).to_numpy()
        if opts.keep_events:
            keep = pc.is_in(events, value_set=pa.array(list(opts.keep_events))).to_numpy(zero_copy_only=False)
            fl.flag("event_filtered", ~keep, opts.event_col, events)
    elif opts.keep_events:
        raise DatasetError(f"keep_events is set but the interactions have no {opts.event_col!r} column")
    if opts.min_weight is not None:
        if weights is None:
            raise DatasetError(f"min_weight is set but the interactions have no {opts.weight_col!r} column")
        fl.flag("below_min_weight", ~(weights >= opts.min_weight), opts.weight_col, weights)
    return _Rows(users, uraw, iraw, code, times, event_code)


def _time_order(user_code: np.ndarray, times: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Rows of `live`, sorted by (user, time); the sort is stable, so equal times keep file order (as SASRec's
    preprocessing does). One int64 key (user << 40 | time offset) sorts twice as fast as a two-key lexsort."""
    idx = np.flatnonzero(live)
    u, t = user_code[idx], times[idx]
    if not len(idx):
        return idx
    t0 = int(t.min())
    if int(u.max()) < 2**23 and int(t.max()) - t0 < 2**40:
        return idx[np.argsort((u << 40) | (t - t0), kind="stable")]
    return idx[np.lexsort((t, u))]


def _flag_duplicates(fl: _Flags, r: _Rows, user_code: np.ndarray, order: np.ndarray, opts: LoadOptions) -> None:
    """Rows equal in user, item, timestamp (and event) to an earlier row. Only rows that tie with a neighbour in
    (user, time) order can be duplicates; those are sorted again by item (and event), stably, so of equal rows
    the first in file order comes first and is the one kept."""
    u, t = user_code[order], r.times[order]
    same = (u[1:] == u[:-1]) & (t[1:] == t[:-1])
    tied = np.zeros(len(order), bool)
    tied[1:] |= same
    tied[:-1] |= same
    rows = order[tied]
    keys = [r.item_code[rows], np.cumsum(np.concatenate([[True], ~same]))[tied]]  # item within its (user, time)
    if r.event_code is not None:
        keys.insert(0, r.event_code[rows])
    o = np.lexsort(keys)
    equal = np.ones(max(len(rows) - 1, 0), bool)
    for k in keys:
        ks = k[o]
        equal &= ks[1:] == ks[:-1]
    mask = np.zeros(fl.table.n, bool)
    mask[rows[o[1:][equal]]] = True
    cols = f"{opts.user_col},{opts.item_col},{opts.time_col}"
    show = lambda i: f"{r.user_raw(i)}, {r.item_raw(i)}, {r.times[i]}"  # noqa: E731
    fl.flag("duplicate_row", mask, cols, show)


def _user_codes(users: pa.Array, live: np.ndarray) -> tuple[np.ndarray, pa.Array]:
    """Dense user codes in id order (integers by value, strings by UTF-8 bytes) and the ids in that order."""
    uniq = users.filter(pa.array(live)).unique()
    uniq = uniq.take(pc.sort_indices(uniq))
    code = pc.index_in(users, value_set=uniq).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return code, uniq


def _kcore(fl: _Flags, item_fl: _Flags, cat: _Catalog, user_code: np.ndarray, r: _Rows, opts: LoadOptions) -> None:
    """Drop users and items below their minimum, again and again until nothing changes (the research k-core)."""
    n_users, n_items = int(user_code.max(initial=-1)) + 1, len(cat.keys)
    while True:
        alive = ~fl.dropped
        if not alive.any():
            return
        cu = np.bincount(user_code[alive], minlength=n_users)
        ci = np.bincount(r.item_code[alive], minlength=n_items)
        low_u = alive & (cu[np.where(alive, user_code, 0)] < opts.min_user_interactions)
        low_i = alive & (ci[np.where(alive, r.item_code, 0)] < opts.min_item_interactions)
        if not (low_u.any() or low_i.any()):
            break
        fl.flag("user_min_interactions", low_u, opts.user_col, lambda i, cu=cu: _count(r.user_raw, cu, user_code, i))
        fl.flag("item_min_interactions", low_i, opts.item_col, lambda i, ci=ci: _count(r.item_raw, ci, r.item_code, i))
    if opts.min_item_interactions > 0:  # items (interacted with or not) below the minimum leave the catalog
        low = np.zeros(item_fl.table.n, bool)
        low[cat.rows[ci < opts.min_item_interactions]] = True
        item_fl.flag("item_min_interactions", low, opts.item_col, lambda i: f"{ci[np.searchsorted(cat.rows, i)]} left")


def _count(shown: Callable[[int], str], counts: np.ndarray, code: np.ndarray, row: int) -> str:
    return f"{shown(row)} ({counts[code[row]]} interactions)"


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------
def load_tables(name: str, interactions: list[Part], items: list[Part], opts: LoadOptions = LoadOptions()) -> Dataset:
    """The one loader: check both tables, report, filter, order each user's events by time (ties keep file order)."""
    inter, item_t = _Table("interactions", interactions), _Table("items", items)
    inter.require([opts.user_col, opts.item_col, opts.time_col])
    item_t.require([opts.item_col, *(opts.template_fields() if opts.text_template else [opts.text_col])])
    report = LoadReport([p.name for p in interactions], [p.name for p in items], inter.n, item_t.n)
    item_kind = decide_kind([(item_t, opts.item_col), (inter, opts.item_col)], opts.item_id_kind, report.kind_notes)
    user_kind = decide_kind([(inter, opts.user_col)], opts.user_id_kind, report.kind_notes)
    report.item_id_kind, report.user_id_kind = item_kind, user_kind
    cat, item_fl = _read_items(item_t, opts, item_kind, report)
    fl = _Flags(inter, report)
    rows = _check_interactions(inter, opts, (item_kind, user_kind), cat, fl)
    user_code, user_ids = _user_codes(rows.users, ~fl.dropped)
    order = _time_order(user_code, rows.times, ~fl.dropped)
    _flag_duplicates(fl, rows, user_code, order, opts)
    _kcore(fl, item_fl, cat, user_code, rows, opts)
    report.interactions_kept = int((~fl.dropped).sum())
    report.items_kept = int((~item_fl.dropped).sum())
    report.users_kept = len(np.unique(user_code[~fl.dropped]))
    if report.bad_rows and opts.on_bad_rows == "fail":
        raise DatasetError(
            f'{report.bad_rows:,} bad row{"s" if report.bad_rows != 1 else ""}, and on_bad_rows = "fail": fix them, '
            'or set on_bad_rows = "skip" '
            f"to drop them\n{report.summary()}"
        )
    ds = _assemble(name, cat, item_fl, user_code, user_ids, rows, order[~fl.dropped[order]], report)
    ds.meta.update(item_id_kind=item_kind, user_id_kind=user_kind, load_report=report)
    return ds


def _keys(ids: pa.Array, kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw ids, string keys or None) of a kept id column (service/ids.py: an int is its own raw id)."""
    if kind == "int":
        return ids.to_numpy(zero_copy_only=False).astype(np.int64), None
    keys = ids.to_pylist()
    try:
        return keys_to_raw(keys), np.array(keys, dtype=str)
    except ValueError as e:
        raise DatasetError(f"string ids: {e}") from e


def _assemble(
    name: str,
    cat: _Catalog,
    item_fl: _Flags,
    user_code: np.ndarray,
    user_ids: pa.Array,
    r: _Rows,
    order: np.ndarray,
    report: LoadReport,
) -> Dataset:
    """The Dataset from the rows kept, `order`ed by (user, time): items renumbered 1..N in items-file order,
    users in id order."""
    kept_items = ~item_fl.dropped[cat.rows]
    new_item = np.cumsum(kept_items)  # catalog position -> item index 1..N, in items-file order
    has_rows = np.bincount(user_code[order], minlength=len(user_ids)) > 0
    new_user = np.cumsum(has_rows) - 1
    u = new_user[user_code[order]]
    items, times = new_item[r.item_code[order]], r.times[order]
    lengths = np.bincount(u, minlength=int(has_rows.sum()))
    if not len(items):
        raise DatasetError(f"no interactions left\n{report.summary()}")
    bounds = np.cumsum(lengths)[:-1]
    take = pa.array(np.flatnonzero(kept_items))
    item_raw, item_keys = _keys(cat.keys.take(take), report.item_id_kind)
    user_raw, user_keys = _keys(user_ids.filter(pa.array(has_rows)), report.user_id_kind)
    titles = None if cat.titles is None else cat.titles.take(take).fill_null("").to_pylist()
    return Dataset(
        name,
        item_raw,
        cat.texts.take(take).to_pylist(),
        user_raw,
        np.split(items, bounds),
        np.split(times, bounds),
        item_keys=item_keys,
        user_keys=user_keys,
        item_titles=titles,
    )
