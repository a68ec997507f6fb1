"""API keys (issue 10) over real HTTP (uvicorn) and a real gRPC channel: write endpoints answer 401 without a key
and 403 with a key lacking the scope, read endpoints are open unless `require_read_key`, and no key ever shows up
in the log output of the run (the API's loggers and the processes' stdout/stderr), in /metrics or in an answer."""

from __future__ import annotations

import logging
import time

import grpc
import httpx
import pytest

from service.auth import KeyRing, parse_entry
from service.catalog import Catalog
from service.proto import recommender_pb2 as pb
from service.proto import recommender_pb2_grpc as pbg
from service.settings import Settings
from tests.conftest import RunningServer, server_settings

WRITE_SECRET = "wk-Secret-For-Issue10-0123456789"
READ_SECRET = "rk-Secret-For-Issue10-9876543210"
ADMIN_SECRET = "ak-Secret-For-Issue10-5555555555"
SECRETS = (WRITE_SECRET, READ_SECRET, ADMIN_SECRET)


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    # The read key comes from a file, the others from settings: both sources are used.
    p = tmp_path_factory.mktemp("keys") / "keys.txt"
    p.write_text(f"# falconrec keys\nread:{READ_SECRET}\n\n")
    return p


@pytest.fixture(scope="module")
def keyed(tiny_build, keys_file):
    s = RunningServer(
        server_settings(
            tiny_build, api_keys=[f"write:{WRITE_SECRET}", f"admin:{ADMIN_SECRET}"], api_keys_file=keys_file
        )
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def read_locked(tiny_build, keys_file):
    s = RunningServer(
        server_settings(tiny_build, api_keys=[f"write:{WRITE_SECRET}"], api_keys_file=keys_file, require_read_key=True)
    )
    yield s
    s.stop()


def _event(catalog) -> dict:
    uid = next(iter(catalog.user_histories))
    return {"events": [{"user_id": uid, "item_id": int(catalog.raw_ids[3]), "ts": int(time.time()) - 5}]}


def test_key_entries_parse_and_errors_never_show_the_secret():
    k = parse_entry(f"read,write:{WRITE_SECRET}", "#1")
    assert k.scopes == {"read", "write"} and WRITE_SECRET.encode() not in k.digest
    for bad in (f"bogus:{WRITE_SECRET}", WRITE_SECRET, "write:short", f":{WRITE_SECRET}"):
        with pytest.raises(ValueError) as e:
            parse_entry(bad, "#2")
        assert WRITE_SECRET not in str(e.value) and "short" not in str(e.value).replace("shorter", "")
    ring = KeyRing.from_settings(Settings(api_keys=[f"write:{WRITE_SECRET}"]))
    assert ring.scopes(WRITE_SECRET) == {"write"} and ring.scopes(READ_SECRET) is None
    assert WRITE_SECRET not in repr(Settings(api_keys=[f"write:{WRITE_SECRET}"]))  # SecretStr: never in a repr


def test_write_endpoints_need_a_key_with_the_scope(keyed, catalog):
    body = _event(catalog)
    item = {"items": [{"item_id": 10**12, "text": "a title (2001) | Drama"}]}
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        for path, payload in (("/v1/events", body), ("/v1/items", item)):
            r = c.post(path, json=payload)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
            assert c.post(path, json=payload, headers={"authorization": "Basic abc"}).status_code == 401
            assert c.post(path, json=payload, headers=bearer("not-a-key-of-ours-at-all")).status_code == 401
            r = c.post(path, json=payload, headers=bearer(READ_SECRET))
            assert r.status_code == 403 and "write" in r.json()["detail"], r.text
        assert c.post("/v1/events", json=body, headers=bearer(WRITE_SECRET)).status_code == 200
        assert c.post("/v1/events", json=body, headers=bearer(ADMIN_SECRET)).status_code == 200  # admin: every scope
        # Reads stay open by default, with or without a key.
        uid = body["events"][0]["user_id"]
        assert c.post("/v1/recommend", json={"user_id": uid}).status_code == 200
        doc = c.get("/openapi.json").json()
        assert "401" in doc["paths"]["/v1/events"]["post"]["responses"]
        assert "401" not in doc["paths"]["/v1/recommend"]["post"]["responses"]


def test_read_key_setting_locks_reads(read_locked, catalog):
    uid = next(iter(catalog.user_histories))
    with httpx.Client(base_url=read_locked.url, timeout=30) as c:
        assert c.post("/v1/recommend", json={"user_id": uid}).status_code == 401
        r = c.post("/v1/recommend", json={"user_id": uid, "k": 0})  # no key and a bad body: the key comes first
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.post("/v1/recommend", json={"user_id": uid}, headers=bearer(WRITE_SECRET)).status_code == 403
        assert c.post("/v1/recommend", json={"user_id": uid}, headers=bearer(READ_SECRET)).status_code == 200
        r = c.post("/v1/score", json={"user_id": uid, "item_ids": [int(catalog.raw_ids[0])]})
        assert r.status_code == 401
        assert c.get("/healthz").status_code == 200  # probes stay open
    with grpc.insecure_channel(f"127.0.0.1:{read_locked.settings.grpc_port}") as ch:
        stub = pbg.RecommenderStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Recommend(pb.RecommendRequest(user_id=uid), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        meta = (("authorization", f"Bearer {READ_SECRET}"),)
        assert stub.Recommend(pb.RecommendRequest(user_id=uid), timeout=30, metadata=meta).items


def test_grpc_write_methods_use_the_same_keys(keyed, catalog):
    ev = _event(catalog)["events"][0]
    req = pb.RecordEventsRequest(events=[pb.Event(**ev)])
    with grpc.insecure_channel(f"127.0.0.1:{keyed.settings.grpc_port}") as ch:
        stub = pbg.RecommenderStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.RecordEvents(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.RecordEvents(req, timeout=30, metadata=(("authorization", f"Bearer {READ_SECRET}"),))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and READ_SECRET not in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.AddItems(pb.AddItemsRequest(items=[pb.NewItem(item_id=1, text="x")]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        out = stub.RecordEvents(req, timeout=30, metadata=(("authorization", f"Bearer {WRITE_SECRET}"),))
        assert out.written + out.duplicates == 1


def test_keys_never_reach_logs_metrics_or_answers(keyed, catalog, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # everything the API process logs, debug included
    answers: list[str] = []
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        for secret in (*SECRETS, "wrong-" + WRITE_SECRET):
            for path, payload in (
                ("/v1/events", _event(catalog)),
                ("/v1/events", {"events": [{"user_id": 1, "item_id": -1, "ts": 0}]}),  # 422
                ("/v1/items", {"items": [{"item_id": int(catalog.raw_ids[0]), "text": "known id"}]}),  # 409
                ("/v1/recommend", {"user_id": 10**15}),  # 404
            ):
                r = c.post(path, json=payload, headers=bearer(secret))
                answers.append(r.text + str(r.headers))
        metrics = c.get("/metrics").text
        ready = c.get("/readyz").text
    with grpc.insecure_channel(f"127.0.0.1:{keyed.settings.grpc_port}") as ch:
        stub = pbg.RecommenderStub(ch)
        for secret in SECRETS:
            try:
                stub.RecordEvents(
                    pb.RecordEventsRequest(), timeout=30, metadata=(("authorization", f"Bearer {secret}"),)
                )
            except grpc.RpcError as e:
                answers.append(e.details() or "")
    out, err = capfd.readouterr()
    seen = "\n".join([caplog.text, out, err, metrics, ready, *answers])
    assert "POST" in seen or answers  # something was captured at all
    for secret in SECRETS:
        assert secret not in seen
        assert secret[:12] not in seen  # not even a prefix
