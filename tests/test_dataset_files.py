"""The dataset format and its one loader (issue 24, docs/data.md): Parquet, CSV/TSV and JSON Lines read to the same
Dataset; every bad-row reason reported with file, row and column; the k-core; string ids through Dataset.save/load;
ML-1M and the synthetic catalog unchanged by going through the loader; a tiny build over a string-id catalog."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from service.contract import MANIFEST
from service.ids import keys_to_raw
from tests.conftest import ML1M
from training.config import CONFIG_DIR, load_config
from training.data import Dataset, DatasetError, load_ml1m, make_synthetic
from training.dataset_files import LoadOptions, Part, load_files, load_tables

TEMPLATE = LoadOptions(text_template="{title} | {genres}")
T0 = 1_700_000_000


# --------------------------------------------------------------------------------------------------
# A small catalog with string ids, written in every file kind
# --------------------------------------------------------------------------------------------------
def catalog(users: int = 24, items: int = 30) -> tuple[dict, dict]:
    """Column dicts of an interactions and an items table: SKU-like item ids (one with a leading zero), user ids
    like "user-3f", genres as lists, ties in time (same second) on purpose."""
    ds = make_synthetic(users, items, min_len=4, max_len=9, seed=5)
    sku = [f"{i:05d}" if i == 7 else f"B0{i:04d}X" for i in range(1, items + 1)]
    inter = {"user_id": [], "item_id": [], "timestamp": []}
    for u, (s, t) in enumerate(zip(ds.seqs, ds.times, strict=True)):
        for i, ts in zip(s.tolist(), t.tolist(), strict=True):
            inter["user_id"].append(f"user-{u * 37 % 101:x}")
            inter["item_id"].append(sku[i - 1])
            inter["timestamp"].append(T0 + (ts - T0) // 7200 * 3600)  # coarse: some equal times within a user
    titles = [t.split(" | ")[0] for t in ds.item_texts]
    genres = [[t.split(" | ")[1], "Film"] for t in ds.item_texts]
    return inter, {"item_id": sku, "title": titles, "genres": genres, "metadata": [{"rank": i} for i in range(items)]}


def iso(ts: int) -> str:
    return np.datetime_as_string(np.datetime64(ts, "s")) + "Z"


def write(d: Path, kind: str, inter: dict, items: dict) -> tuple[Path, Path]:
    """The same tables as Parquet (seconds), CSV.gz (milliseconds), TSV (ISO, no zone) or JSONL.zst (ISO + zone)."""
    d.mkdir(parents=True, exist_ok=True)
    flat = {**items, "genres": [", ".join(g) for g in items["genres"]]}
    flat.pop("metadata")
    if kind == "parquet":
        pq.write_table(pa.table(inter), d / "interactions.parquet")
        pq.write_table(pa.table(items), d / "items.parquet")
        return d / "interactions.parquet", d / "items.parquet"
    if kind in ("csv", "tsv"):
        ext, opts = (".csv.gz", pacsv.WriteOptions()) if kind == "csv" else (".tsv", pacsv.WriteOptions(delimiter="\t"))
        times = [t * 1000 for t in inter["timestamp"]] if kind == "csv" else [iso(t)[:-1] for t in inter["timestamp"]]
        for name, cols in (("interactions", {**inter, "timestamp": times}), ("items", flat)):
            with pa.output_stream(str(d / f"{name}{ext}"), compression="detect") as f:
                pacsv.write_csv(pa.table(cols), f, opts)
        return d / f"interactions{ext}", d / f"items{ext}"
    for name, cols in (
        ("interactions", {**inter, "timestamp": [iso(t) for t in inter["timestamp"]]}),
        ("items", items),
    ):
        rows = [dict(zip(cols, vals, strict=True)) for vals in zip(*cols.values(), strict=True)]
        with pa.output_stream(str(d / f"{name}.jsonl.zst"), compression="detect") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
    return d / "interactions.jsonl.zst", d / "items.jsonl.zst"


def test_same_catalog_from_parquet_csv_tsv_jsonl(tmp_path):
    inter, items = catalog()
    loaded = {k: load_files(*write(tmp_path / k, k, inter, items), TEMPLATE, name="shop") for k in ("parquet", "csv")}
    loaded |= {k: load_files(*write(tmp_path / k, k, inter, items), TEMPLATE, name="shop") for k in ("tsv", "jsonl")}
    ref = loaded["parquet"]
    assert ref.meta["item_id_kind"] == ref.meta["user_id_kind"] == "str"
    assert "00007" in ref.item_keys.tolist()  # CSV read ids as text: the leading zero survives
    assert ref.item_keys.tolist() == items["item_id"]  # catalog order = items-file order
    assert ref.item_raw_ids.tolist() == keys_to_raw(ref.item_keys).tolist()
    assert ref.user_raw_ids.tolist() == keys_to_raw(ref.user_keys).tolist()
    assert ref.user_keys.tolist() == sorted(set(inter["user_id"]))
    assert ref.item_texts[0] == f"{items['title'][0]} | {', '.join(items['genres'][0])}"
    assert ref.item_titles == items["title"]
    for kind, ds in loaded.items():
        assert ds.fingerprint() == ref.fingerprint(), kind
        assert ds.item_texts == ref.item_texts and ds.item_titles == ref.item_titles, kind
        assert ds.user_keys.tolist() == ref.user_keys.tolist(), kind
        assert ds.meta["load_report"].bad_rows == 0, kind
    # each user's events are in time order, and ties (there are some) keep file order
    uid = ref.user_keys[0]
    mine = [(t, i) for x, i, t in zip(inter["user_id"], inter["item_id"], inter["timestamp"], strict=True) if x == uid]
    assert len({t for t, _ in mine}) < len(mine)
    order = sorted(range(len(mine)), key=lambda k: mine[k][0])  # Python's sort is stable too
    assert ref.item_keys[ref.seqs[0] - 1].tolist() == [mine[k][1] for k in order]
    assert ref.times[0].tolist() == [mine[k][0] for k in order]


def test_integer_ids_and_time_units(tmp_path):
    """Integer ids stay integers (their own raw ids, no keys); milliseconds are found by size; a CSV id written
    with a leading zero makes the column a string column, and the report says why."""
    inter = {"user_id": [5, 5, 5, 9, 9, 9], "item_id": [10, 11, 12, 12, 11, 10]}
    # milliseconds; user 9's three fall in one second: a tie, kept in file order
    inter["timestamp"] = [T0 * 1000 + k for k in (3000, 1000, 2000, 1, 2, 3)]
    items = {"item_id": [12, 11, 10], "text": ["c", "b", "a"]}
    pq.write_table(pa.table(inter), tmp_path / "i.parquet")
    pq.write_table(pa.table(items), tmp_path / "items.parquet")
    ds = load_files(tmp_path / "i.parquet", tmp_path / "items.parquet")
    assert ds.item_keys is None and ds.user_keys is None and ds.meta["user_id_kind"] == "int"
    assert ds.item_raw_ids.tolist() == [12, 11, 10] and ds.user_raw_ids.tolist() == [5, 9]
    assert [ds.item_raw_ids[s - 1].tolist() for s in ds.seqs] == [[11, 12, 10], [12, 11, 10]]
    assert ds.times[0].tolist() == [T0 + 1, T0 + 2, T0 + 3] and ds.times[1].tolist() == [T0] * 3
    assert ds.meta["load_report"].time_unit == "ms"
    (tmp_path / "items.csv").write_text("item_id,text\n012,c\n11,b\n10,a\n")
    with pytest.raises(DatasetError, match="unknown_item") as e:
        load_files(tmp_path / "i.parquet", tmp_path / "items.csv")
    assert "has '012'" in str(e.value)  # why the ids became strings


def test_every_bad_row_reason_is_reported_with_file_row_column(tmp_path):
    (tmp_path / "items.csv").write_text(
        "item_id,title,genres\n"
        "a1,Alpha,X\n"
        "a2,Beta,\n"  # row 2: one field empty is still text
        "a3,,\n"  # row 3: no text
        "a2,Beta again,Y\n"  # row 4: duplicate item
        ",Nameless,Z\n"  # row 5: missing id
        f"{'z' * 129},Long,Z\n"  # row 6: id over 128 characters
    )
    rows = [
        ("u1", "a1", "100", "1"),
        ("u1", "a2", "2024-05-01T10:00:00+02:00", "2"),
        ("u1", "a1", "300", "3"),
        ("u1", "a1", "300", "3"),  # row 4: duplicate row
        ("u2", "a1", "", "1"),  # row 5: missing timestamp
        ("u2", "a2", "yesterday", "1"),  # row 6: unparsable timestamp
        ("u2", "nope", "7", "1"),  # row 7: unknown item
        ("u2", "a3", "8", "1"),  # row 8: its item had no text
        ("", "a1", "9", "1"),  # row 9: missing user
        ("u2", "a1", "10", "lots"),  # row 10: weight not a number
        ("u3", "a1", "11", "1"),  # row 11: u3 has 1 interaction (< 3)
        ("u2", "a2", "2024-13-40T00:00:00", "1"),  # row 12: looks ISO, is no date
    ]
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,timestamp,weight\n" + "".join(",".join(r) + "\n" for r in rows)
    )
    opts = replace(TEMPLATE, on_bad_rows="skip")
    ds = load_files(tmp_path / "events.csv", tmp_path / "items.csv", opts)
    rep = ds.meta["load_report"]
    inter, items = str(tmp_path / "events.csv"), str(tmp_path / "items.csv")
    expect = {
        ("items", "no_text"): [(items, 3, "title,genres")],
        ("items", "duplicate_item"): [(items, 4, "item_id")],
        ("items", "missing"): [(items, 5, "item_id")],
        ("items", "bad_value"): [(items, 6, "item_id")],
        ("interactions", "duplicate_row"): [(inter, 4, "user_id,item_id,timestamp")],
        ("interactions", "missing"): [(inter, 9, "user_id"), (inter, 5, "timestamp")],
        ("interactions", "bad_value"): [(inter, 6, "timestamp"), (inter, 12, "timestamp"), (inter, 10, "weight")],
        ("interactions", "unknown_item"): [(inter, 7, "item_id"), (inter, 8, "item_id")],
        ("interactions", "user_min_interactions"): [(inter, 11, "user_id")],
    }
    got = {k: [(e.file, e.row, e.column) for e in r.examples] for k, r in rep.reasons.items() if r.count}
    assert got == expect
    assert {k: r.count for k, r in rep.reasons.items() if r.count} == {k: len(v) for k, v in expect.items()}
    assert ds.user_keys.tolist() == ["u1"] and ds.item_keys.tolist() == ["a1", "a2"]
    assert ds.item_keys[ds.seqs[0] - 1].tolist() == ["a1", "a1", "a2"]
    assert ds.times[0].tolist() == [100, 300, 1714550400]  # 10:00+02:00 is 08:00 UTC
    assert (rep.interactions_read, rep.interactions_kept, rep.items_kept, rep.users_seen) == (12, 3, 2, 2)
    text = rep.summary()
    assert f"{inter} row 6 column timestamp = 'yesterday'" in text and f"{items} row 3" in text
    # fail (the default) stops with that report
    with pytest.raises(DatasetError) as e:
        load_files(tmp_path / "events.csv", tmp_path / "items.csv", TEMPLATE)
    msg = str(e.value)
    assert 'on_bad_rows = "fail"' in msg and "12 bad rows" in msg
    assert f"{inter} row 7 column item_id = 'nope'" in msg and f"{items} row 4 column item_id = 'a2'" in msg


def test_missing_columns_and_unknown_files_are_clear(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,name\n1,x\n")
    (tmp_path / "e.csv").write_text("user,item_id,timestamp\n1,1,1\n")
    with pytest.raises(DatasetError, match=r"lacks column\(s\) user_id; it has user, item_id, timestamp"):
        load_files(tmp_path / "e.csv", tmp_path / "items.csv")
    with pytest.raises(DatasetError, match="lacks column.*title, genres"):
        load_files(tmp_path / "e.csv", tmp_path / "items.csv", replace(TEMPLATE, user_col="user"))
    (tmp_path / "e.xlsx").write_text("")
    with pytest.raises(DatasetError, match="unknown file kind"):
        load_files(tmp_path / "e.xlsx", tmp_path / "items.csv")
    with pytest.raises(DatasetError, match="does not exist"):
        load_files(tmp_path / "nope.csv", tmp_path / "items.csv")


def test_a_directory_of_parts_is_one_table_and_rows_name_their_file(tmp_path):
    inter, items = catalog(users=10, items=12)
    one, items_path = write(tmp_path / "one", "parquet", inter, items)
    table = pq.read_table(one)
    bad = table.slice(40).to_pydict()
    bad["timestamp"][2] = -5  # before 1970
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 40), tmp_path / "parts" / "part-0.parquet")
    pq.write_table(pa.table(bad), tmp_path / "parts" / "part-1.parquet")
    (tmp_path / "parts" / "_SUCCESS").write_text("")  # Spark's marker: skipped
    with pytest.raises(DatasetError, match=r"part-1.parquet row 3 column timestamp = -5"):
        load_files(tmp_path / "parts", items_path, TEMPLATE)
    pq.write_table(table.slice(40), tmp_path / "parts" / "part-1.parquet")
    assert (
        load_files(tmp_path / "parts", items_path, TEMPLATE, name="shop").fingerprint()
        == load_files(one, items_path, TEMPLATE, name="shop").fingerprint()
    )
    (tmp_path / "mixed.jsonl").write_text('{"user_id": 1, "item_id": "B0001X", "timestamp": 5}\n{"user_id": "u"}\n')
    with pytest.raises(DatasetError, match="all numbers or all strings"):
        load_files(tmp_path / "mixed.jsonl", items_path, TEMPLATE)


def test_kcore_is_iterated_to_a_fixed_point():
    """min 2 per user and per item: item c has one event -> dropped; then u3 has one left -> dropped; then item b
    has one left -> dropped; then u2 has one left -> dropped. What stays is the 2-core: u1, u4 x a, d."""
    ev = [("u1", "a"), ("u1", "d"), ("u4", "a"), ("u4", "d"), ("u2", "a"), ("u2", "b"), ("u3", "b"), ("u3", "c")]
    inter = pa.table({"user_id": [u for u, _ in ev], "item_id": [i for _, i in ev], "timestamp": list(range(8))})
    items = pa.table({"item_id": list("abcde"), "text": list("ABCDE")})
    opts = LoadOptions(min_user_interactions=2, min_item_interactions=2)
    ds = load_tables("k", [Part("e", inter)], [Part("i", items)], opts)
    assert ds.user_keys.tolist() == ["u1", "u4"] and ds.item_keys.tolist() == ["a", "d"]
    rep = ds.meta["load_report"]
    assert rep.reasons[("interactions", "user_min_interactions")].count == 2  # u3's b, u2's a
    assert rep.reasons[("interactions", "item_min_interactions")].count == 2  # u3's c, u2's b
    assert rep.reasons[("items", "item_min_interactions")].count == 3  # b, c, and e (never interacted with)
    assert rep.bad_rows == 0
    # without an item minimum, items nobody interacted with stay in the catalog (cold items)
    ds = load_tables("k", [Part("e", inter)], [Part("i", items)], LoadOptions(min_user_interactions=2))
    assert ds.item_keys.tolist() == list("abcde") and ds.num_users == 4


def test_event_and_weight_filters():
    inter = pa.table(
        {
            "user_id": [1] * 5,
            "item_id": [1, 2, 3, 1, 2],
            "timestamp": [1, 2, 3, 4, 5],
            "event": ["buy", "view", "buy", "buy", None],
            "weight": [5.0, 5.0, 1.0, 4.0, 5.0],
        }
    )
    items = pa.table({"item_id": [1, 2, 3], "text": ["a", "b", "c"]})
    opts = LoadOptions(keep_events=("buy",), min_weight=4.0, min_user_interactions=1)
    ds = load_tables("f", [Part("e", inter)], [Part("i", items)], opts)
    assert ds.seqs[0].tolist() == [1, 1]
    rep = ds.meta["load_report"]
    assert rep.reasons[("interactions", "event_filtered")].count == 2
    assert rep.reasons[("interactions", "below_min_weight")].count == 1


# --------------------------------------------------------------------------------------------------
# Persistence of the id map
# --------------------------------------------------------------------------------------------------
def test_string_id_map_round_trips_through_save_and_load(tmp_path):
    inter, items = catalog(users=10, items=12)
    ds = load_files(*write(tmp_path, "parquet", inter, items), TEMPLATE)
    ds.save(tmp_path / "data.npz")
    z = np.load(tmp_path / "data.npz", allow_pickle=False)
    assert {"item_keys", "user_keys", "id_kinds", "item_titles"} <= set(z.files)
    back = Dataset.load(tmp_path / "data.npz")
    assert back.item_keys.tolist() == ds.item_keys.tolist() == items["item_id"]
    assert back.user_keys.tolist() == ds.user_keys.tolist()
    assert back.item_raw_ids.tolist() == keys_to_raw(back.item_keys.tolist()).tolist()
    assert back.user_raw_ids.tolist() == keys_to_raw(back.user_keys.tolist()).tolist()
    assert back.meta["item_id_kind"] == back.meta["user_id_kind"] == "str"
    assert back.fingerprint() == ds.fingerprint() and back.item_titles == ds.item_titles
    # an integer catalog writes no key entries (the service reads their absence as "int")
    make_synthetic(20, 30).save(tmp_path / "int.npz")
    z = np.load(tmp_path / "int.npz", allow_pickle=False)
    assert "item_keys" not in z.files and "user_keys" not in z.files and z["id_kinds"].tolist() == ["int", "int"]


# --------------------------------------------------------------------------------------------------
# MovieLens-1M and synthetic: the numbers recorded from the loaders before issue 24 (commit d859b15)
# --------------------------------------------------------------------------------------------------
def _digest(ds: Dataset) -> dict:
    h = lambda b: hashlib.sha256(b).hexdigest()[:16]  # noqa: E731
    return {
        "fingerprint": ds.fingerprint(),
        "users": h(ds.user_raw_ids.astype(np.int64).tobytes()),
        "texts": h("\n".join(ds.item_texts).encode()),
        "sizes": (ds.num_users, ds.num_items, int(sum(map(len, ds.seqs)))),
        "dtypes": {str(a.dtype) for a in (ds.item_raw_ids, ds.user_raw_ids, ds.seqs[0], ds.times[0])},
    }


@pytest.mark.skipif(not ML1M.is_dir(), reason="MovieLens-1M not present beside the checkout")
def test_ml1m_through_the_loader_is_identical_to_before():
    ds = load_ml1m(ML1M)
    assert _digest(ds) == {
        "fingerprint": "dd983fc17be60fac",
        "users": "778f9345757ada75",
        "texts": "85e8f65eced74ba7",
        "sizes": (6040, 3883, 1000209),
        "dtypes": {"int64"},
    }
    assert ds.item_keys is None and ds.meta["load_report"].interactions_kept == 1_000_209


def test_synthetic_through_the_loader_is_identical_to_before():
    ds = make_synthetic(300, 400, seed=0)  # the tiny config's catalog
    assert _digest(ds) == {
        "fingerprint": "d84de19429da5db4",
        "users": "7e082dd82439dac6",
        "texts": "24c58ff341c382b7",
        "sizes": (300, 400, 7041),
        "dtypes": {"int64"},
    }
    assert hashlib.sha256(ds.meta["clusters"].tobytes()).hexdigest()[:16] == "714146d4ec820bb0"
    assert _digest(make_synthetic(50, 60, seed=3))["fingerprint"] == "d4a7c22197d7941d"


# --------------------------------------------------------------------------------------------------
# Config and a build
# --------------------------------------------------------------------------------------------------
def _config(tmp_path: Path, data: str, name: str = "shop") -> Path:
    """tiny.toml with its [data] replaced and training cut to the bone."""
    raw = (CONFIG_DIR / "tiny.toml").read_text()
    head, rest = raw.split("[data]", 1)
    rest = rest[rest.index("\n[") :]
    text = f"{head}[data]\n{data}\n{rest}".replace("epochs = 6", "epochs = 1")
    tomllib.loads(text)
    (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path / f"{name}.toml"


@pytest.mark.parametrize(
    "data, needle",
    [
        ('source = "files"', "needs interactions and items"),
        ('source = "files"\ninteractions = "a"\nitems = "b"\non_bad_rows = "ignore"', "on_bad_rows must be one of"),
        ('source = "parquet"', "source must be one of synthetic, ml1m, files"),
        ('time_unit = "us"', "time_unit must be one of auto, s, ms"),
        ("min_user_interactions = -1", "min_user_interactions must be a whole number"),
        ('text_template = "{title:>10}"', "use plain column names"),
        ('text_template = "{title"', "text_template"),
        ('user_col = ""', "user_col must name a column"),
    ],
)
def test_config_errors_are_clear(tmp_path, data, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(str(_config(tmp_path, data)))


def test_tiny_build_over_a_string_id_catalog(tmp_path):
    from falconrec.build import Builder, summary_rows
    from falconrec.offline import with_files

    inter, items = catalog(users=40, items=36)
    inter_path, items_path = write(tmp_path / "files", "jsonl", inter, items)
    cfg = load_config(str(_config(tmp_path, f'source = "files"\ninteractions = "{inter_path}"\nitems = "nope"')))
    cfg = with_files(cfg, inter_path, items_path)  # what `falconrec build --interactions --items` does
    cfg = replace(cfg, data=replace(cfg.data, text_template="{title} | {genres}"))
    logs: list[str] = []
    results = Builder(cfg, tmp_path / "artifacts", tmp_path / "repo", log=logs.append).build()
    assert [r.name for r in results][-2:] == ["export", "index"]
    data = results[0]
    assert data.info["id_kinds"] == {"item": "str", "user": "str"} and data.info["items"] == 36
    assert any("ids: items str, users str" in m for m in logs)  # the load report went to the log
    assert "40 users, 36 items" in summary_rows(results)[0][4]
    ds = Dataset.load(tmp_path / "artifacts" / "shop" / "data.npz")
    assert ds.item_keys.tolist() == items["item_id"]
    assert (tmp_path / "repo" / MANIFEST).exists()
    _serves_string_ids(tmp_path, str(ds.user_keys[0]), set(items["item_id"]))


def _serves_string_ids(root: Path, user: str, skus: set[str]) -> None:
    """The build from files serves: a string user id over HTTP and gRPC, the catalog's SKUs in the answers."""
    import grpc
    import httpx

    from service.proto import recommender_pb2 as pb
    from service.proto import recommender_pb2_grpc as pb_grpc
    from tests.conftest import RunningServer, TinyBuild, server_settings

    build = TinyBuild(root)
    build.artifacts, build.repo = root / "artifacts", root / "repo"
    srv = RunningServer(server_settings(build, config="shop"))
    try:
        r = httpx.post(f"{srv.url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        got = [i["item_id"] for i in r.json()["items"]]
        assert len(got) == 5 and set(got) <= skus
        with grpc.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as ch:
            res = pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_key=user, k=5), timeout=30)
        assert [i.item_key for i in res.items] == got
    finally:
        srv.stop()
