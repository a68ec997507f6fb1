"""The Triton backend against the real `tritonserver` (pytriton's bundled binary, Python backend running
the same ONNX files), over gRPC and HTTP; and the fallback when Triton is killed mid-run."""

from __future__ import annotations

import os
import time

import httpx
import numpy as np
import pytest

from exporters.triton_local import DEFAULT_VENV, find_tritonserver, start_tritonserver
from exporters.triton_twin import write_twin
from service.catalog import Catalog
from tests.conftest import ROOT, RunningServer, kill_process_group, server_settings

VENV = ROOT / DEFAULT_VENV
pytestmark = pytest.mark.skipif(
    find_tritonserver(VENV) is None, reason="tritonserver not installed (tests/setup_triton.sh makes .venv-triton)"
)


@pytest.fixture(scope="module")
def triton(tiny_build, tmp_path_factory):
    twin = write_twin(tiny_build.repo, tmp_path_factory.mktemp("triton") / "repo")
    t = start_tritonserver(twin, VENV)
    yield t
    kill_triton(t)


@pytest.fixture(scope="module")
def catalog(tiny_build):
    return Catalog.load(tiny_build.paths.data)


def _requests(catalog):
    users = list(catalog.user_histories)[:5]
    items = catalog.raw_ids[:200].tolist()
    return users, items


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_backend_matches_in_process(tiny_build, triton, server, catalog, protocol):
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    srv = RunningServer(
        server_settings(
            tiny_build, backend="triton", triton_url=url, triton_protocol=protocol, grpc_port=0, triton_timeout_ms=5000
        )
    )
    try:
        users, items = _requests(catalog)
        with httpx.Client(timeout=30) as c:
            ready = c.get(f"{srv.url}/readyz").json()
            assert ready["status"] == "ok" and ready["backend"]["backend"] == "triton"
            for u in users:
                a = c.post(f"{srv.url}/v1/recommend", json={"user_id": u, "k": 10}).json()
                b = c.post(f"{server.url}/v1/recommend", json={"user_id": u, "k": 10}).json()
                assert not a["degraded"], a["degraded_reasons"]
                assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
                assert (
                    np.abs(np.array([i["score"] for i in a["items"]]) - [i["score"] for i in b["items"]]).max() <= 1e-5
                )
                sa = c.post(f"{srv.url}/v1/score", json={"user_id": u, "item_ids": items}).json()
                sb = c.post(f"{server.url}/v1/score", json={"user_id": u, "item_ids": items}).json()
                diff = np.abs(np.array([s["score"] for s in sa["scores"]]) - [s["score"] for s in sb["scores"]])
                assert diff.max() <= 1e-5
    finally:
        srv.stop()


def kill_triton(t) -> None:
    """tritonserver and its Python-backend stubs (one stub was seen alive 48 min after this suite)."""
    kill_process_group(t.proc)
    for _ in range(100):
        if not _group_alive(t.proc.pid):
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of tritonserver's group {t.proc.pid} survived SIGKILL")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killing_triton_falls_back_without_5xx(tiny_build, catalog, tmp_path):
    twin = write_twin(tiny_build.repo, tmp_path / "repo")
    t = start_tritonserver(twin, VENV)
    srv = RunningServer(
        server_settings(
            tiny_build, backend="triton", triton_url=t.grpc_url, grpc_port=0, triton_timeout_ms=2000, triton_retry_s=0.5
        )
    )
    try:
        users, items = _requests(catalog)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert not c.post("/v1/recommend", json={"user_id": users[0]}).json()["degraded"]
            kill_triton(t)  # the whole process group: the server and its Python-backend stubs
            codes = []
            for u in users * 4:
                r = c.post("/v1/recommend", json={"user_id": u})
                codes.append(r.status_code)
                body = r.json()
                assert r.status_code == 200, body
                assert body["degraded"] and any("fell back" in x for x in body["degraded_reasons"])
                assert c.post("/v1/score", json={"user_id": u, "item_ids": items[:10]}).status_code == 200
            ready = c.get("/readyz").json()
            assert ready["status"] == "degraded" and "triton" in ready["reasons"][0]
    finally:
        srv.stop()
        kill_triton(t)


def test_a_request_out_of_budget_does_not_mark_triton_down(tiny_build, triton, catalog):
    """A request whose own budget runs out mid-call is that request's problem: Triton stays in use for the
    next ones (it used to be marked down for retry_s, sending every request to the fallback, degraded)."""
    srv = RunningServer(
        server_settings(tiny_build, backend="triton", triton_url=triton.grpc_url, grpc_port=0, triton_timeout_ms=5000)
    )
    try:
        users, _ = _requests(catalog)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for u in users:  # a budget too small to rank: the ranking call times out on the request's budget
                r = c.post("/v1/recommend", json={"user_id": u, "k": 5, "budget_ms": 1})
                assert r.status_code == 200 and r.json()["degraded"]
            ready = c.get("/readyz").json()
            assert ready["status"] == "ok" and not ready["backend"]["down"], ready
            body = c.post("/v1/recommend", json={"user_id": users[0], "k": 5}).json()
            assert not body["degraded"], body["degraded_reasons"]
    finally:
        srv.stop()


def test_versions_swap_in_triton_and_each_request_names_its_version(tiny_build, second_build, catalog, tmp_path):
    """Issue 25 with Triton: versions published into one Triton repository as Triton versions 1 and 2 (v2 published
    after Triton started, in explicit model-control mode). A promote makes the server ask Triton to load version 2,
    warm it and switch; its answers then come from version 2's graphs in Triton (no fallback configured), equal to
    what v2 gives served in process."""
    from typer.testing import CliRunner

    from exporters.triton_config import TritonOptions
    from exporters.triton_versions import publish
    from falconrec.models import app as models_app

    root, repo = tmp_path / "versions", tmp_path / "triton"
    opts = TritonOptions(instance_kind="KIND_CPU")
    for b in (tiny_build, second_build):
        args = ["add", "--config", "tiny", "--artifacts", str(b.artifacts), "--repo", str(b.repo)]
        assert CliRunner().invoke(models_app, [*args, "--versions", str(root)]).exit_code == 0
    assert CliRunner().invoke(models_app, ["promote", "v1", "--versions", str(root)]).exit_code == 0
    publish(tiny_build.repo, repo, 1, opts, twin=True)
    t = start_tritonserver(repo, VENV, extra_args=("--model-control-mode=explicit", "--load-model=*"))
    s = server_settings(tiny_build, backend="triton", triton_url=t.grpc_url, grpc_port=0, triton_timeout_ms=5000,
                        triton_fallback=False, triton_versioned=True, versions_dir=root,
                        version_poll_s=0.1)  # fmt: skip
    srv = RunningServer(s)
    alone = RunningServer(server_settings(second_build, grpc_port=0))  # v2 in process: the reference
    users, _ = _requests(catalog)
    try:
        with httpx.Client(timeout=30) as c:
            first = c.post(f"{srv.url}/v1/recommend", json={"user_id": users[0], "k": 10}).json()
            assert not first["degraded"], first["degraded_reasons"]
            assert c.get(f"{srv.url}/readyz").json()["backend"]["model_version"] == "1"
            publish(second_build.repo, repo, 2, opts, twin=True)
            promote = ["promote", "v2", "--force", "--versions", str(root)]  # fewer epochs: the gate would refuse it
            assert CliRunner().invoke(models_app, promote).exit_code == 0
            end = time.time() + 120
            while srv.components.watcher.serving != "v2":
                assert time.time() < end, srv.components.watcher.describe()
                time.sleep(0.1)
            assert c.get(f"http://{t.http_url}/v2/models/ranker_candidates/versions/2/ready").status_code == 200
            assert c.get(f"{srv.url}/readyz").json()["backend"]["model_version"] == "2"
            for u in users:
                a = c.post(f"{srv.url}/v1/recommend", json={"user_id": u, "k": 10}).json()
                b = c.post(f"{alone.url}/v1/recommend", json={"user_id": u, "k": 10}).json()
                assert not a["degraded"], a["degraded_reasons"]
                assert a["model_version"] == b["model_version"] != first["model_version"]
                assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]]
                diff = np.abs(np.array([i["score"] for i in a["items"]]) - [i["score"] for i in b["items"]])
                assert diff.max() <= 1e-5
    finally:
        srv.stop()
        alone.stop()
        kill_triton(t)
