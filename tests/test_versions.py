"""Issue 25: model versions, the promotion gate, and the hot swap: a real server follows CURRENT under steady load,
through a promote and a rollback, with no failed request and every answer computed by one version alone."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from falconrec.models import app as models_app
from service.versions import VersionInfo, VersionStore, gate
from tests.conftest import RunningServer, server_settings

WAIT_S = 120.0


def test_gate_refuses_a_worse_version_within_tolerance_only():
    cur = VersionInfo("v1", "tiny", "a", "e", 0.0, {"hr@10": 0.30, "ndcg@10": 0.17})
    close = VersionInfo("v2", "tiny", "b", "e", 1.0, {"hr@10": 0.298, "ndcg@10": 0.171})
    worse = VersionInfo("v3", "tiny", "c", "e", 2.0, {"hr@10": 0.28, "ndcg@10": 0.171})
    assert gate(close, cur, tolerance=0.005) is None
    assert "validation hr@10 0.2800 < 0.3000" in gate(worse, cur, tolerance=0.005)
    assert gate(worse, None, tolerance=0.0) is None  # the first version has nothing to be worse than
    # A retrain's holdout: both versions on the same newest events, compared only against the version it names.
    holdout = {"against": "v1", "users": 400, "candidate": {"hr@10": 0.20}, "current": {"hr@10": 0.25}}
    retrained = dataclasses.replace(close, holdout=holdout)
    assert "holdout (400 users) hr@10 0.2000 < 0.2500" in gate(retrained, cur, tolerance=0.005)
    assert gate(retrained, dataclasses.replace(cur, id="v0"), tolerance=0.005) is None
    few = dataclasses.replace(close, holdout={**holdout, "users": 40})  # too few users to gate on: noise
    assert gate(few, cur, tolerance=0.005) is None


@pytest.fixture(scope="module")
def versions(tiny_build, second_build, tmp_path_factory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("versions")
    ids = []
    for b in (tiny_build, second_build):
        args = ["add", "--config", "tiny", "--artifacts", str(b.artifacts), "--repo", str(b.repo)]
        r = CliRunner().invoke(models_app, [*args, "--versions", str(root)])
        assert r.exit_code == 0, r.output
        ids.append(r.output.strip().splitlines()[-1])
    assert ids == ["v1", "v2"]
    r = CliRunner().invoke(models_app, ["promote", "v1", "--versions", str(root)])
    assert r.exit_code == 0, r.output
    return root, *ids


def test_promote_goes_through_the_gate_and_rollback_goes_back(versions, tmp_path):
    root, v1, v2 = versions
    scratch = tmp_path / "versions"  # a copy: the served versions directory of the next test stays as it is
    vs = VersionStore(scratch)
    for vid in (v1, v2):
        info = VersionStore(root).info(vid)
        assert info.metrics.keys() == {"hr@10", "ndcg@10"}  # the ranker's validation, from the build's summary
        if vid == v2:  # made clearly worse than v1, whatever the seed gave
            info.metrics = {k: v - 0.1 for k, v in VersionStore(root).info(v1).metrics.items()}
        vs.write_info(info)
    vs.set_current(v1)
    run = lambda *a: CliRunner().invoke(models_app, [*a, "--versions", str(scratch)])  # noqa: E731
    refused = run("promote", v2)
    assert refused.exit_code == 1 and "not promoted" in refused.output and vs.current() == v1
    assert run("promote", v2, "--force").exit_code == 0 and vs.current() == v2
    assert run("rollback").exit_code == 0 and vs.current() == v1
    assert run("rollback").exit_code == 1  # nothing before v1


class Load:
    """Requests back to back from two threads while versions change; every answer kept."""

    def __init__(self, url: str, users: list[int]):
        self.url, self.users = url, users
        self.answers: list[tuple[int, str | None, int]] = []  # (status, model_version, user)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(2)]

    def _run(self, offset: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = offset
            while not self.stop.is_set():
                u = self.users[i % len(self.users)]
                r = c.post("/v1/recommend", json={"user_id": u, "k": 5})
                self.answers.append((r.status_code, r.json().get("model_version"), u))
                i += 2

    def versions_seen(self) -> list[str | None]:
        return [v for _, v, _ in self.answers]


def _wait_for(load: Load, model_version: str) -> None:
    end = time.time() + WAIT_S
    n = len(load.answers)
    while model_version not in load.versions_seen()[n:]:
        assert time.time() < end, f"no answer from {model_version} within {WAIT_S} s"
        time.sleep(0.05)


def test_swaps_under_load_lose_no_request_and_each_answer_is_one_versions(versions, tiny_build, second_build):
    root, v1, v2 = versions
    vs = VersionStore(root)
    m1, m2 = vs.info(v1).model_version, vs.info(v2).model_version
    assert m1 != m2
    s = server_settings(tiny_build, versions_dir=root, version_poll_s=0.1, grpc_port=0)
    srv = RunningServer(s)
    users = list(srv.components.catalog.user_histories)[:20]
    probe = {"user_id": users[0], "k": 5}
    load = Load(srv.url, users)
    try:
        before = httpx.post(f"{srv.url}/v1/recommend", json=probe, timeout=30).json()
        for t in load.threads:
            t.start()
        vs.set_current(v2)
        _wait_for(load, m2)
        during = httpx.post(f"{srv.url}/v1/recommend", json=probe, timeout=30).json()
        ready = httpx.get(f"{srv.url}/readyz", timeout=30).json()
        vs.rollback()
        _wait_for(load, m1)
        time.sleep(0.5)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(timeout=30)
        srv.stop()
    statuses = [st for st, _, _ in load.answers]
    assert len(statuses) > 20 and set(statuses) == {200}, f"{len(statuses)} answers: {set(statuses)}"
    assert set(load.versions_seen()) == {m1, m2}
    assert ready["versions"]["version"] == v2 and ready["versions"]["swaps"] == 1 and ready["status"] == "ok"
    assert before["model_version"] == m1 and during["model_version"] == m2
    # What each version alone gives: a server started on that version's files answers the probe the same way.
    for model_version, answer, build in ((m1, before, tiny_build), (m2, during, second_build)):
        alone = RunningServer(server_settings(build, grpc_port=0))
        try:
            ref = httpx.post(f"{alone.url}/v1/recommend", json=probe, timeout=30).json()
        finally:
            alone.stop()
        assert ref["model_version"] == model_version
        assert [i["item_id"] for i in ref["items"]] == [i["item_id"] for i in answer["items"]]
        assert [i["score"] for i in ref["items"]] == pytest.approx([i["score"] for i in answer["items"]], abs=1e-5)


def _other_text_model(vs: VersionStore, vid: str) -> None:
    manifest = vs.repository(vid) / "falconrec.json"
    m = json.loads(manifest.read_text())
    m["embedding_model"] = "another-text-model"
    manifest.write_text(json.dumps(m))


def _before_token_tables(vs: VersionStore, vid: str) -> None:
    from service.contract import USER_TOKENS_FILE

    (vs.artifacts(vid) / "tiny" / "index" / USER_TOKENS_FILE).unlink()  # as a build older than 2026-12-07


@pytest.mark.parametrize(
    "change, said",
    [(_other_text_model, "content embeddings"), (_before_token_tables, "predates precomputed item tokens")],
)
def test_a_version_that_cannot_be_served_is_refused_and_said_so(versions, tiny_build, tmp_path, change, said):
    """Items added live carry the served version's content embeddings, so a version over another text model needs a
    restart; a build older than the token tables can never load. Either is refused once (not retried for ever),
    /readyz says why, and the served version keeps answering."""
    import shutil

    root, v1, _ = versions
    vs = VersionStore(tmp_path / "versions")
    for vid in (v1, "v9"):
        shutil.copytree(VersionStore(root).dir(v1), vs.dir(vid))
    change(vs, "v9")
    info = vs.info(v1)
    vs.write_info(dataclasses.replace(info, id="v9", created=info.created + 1))
    vs.set_current(v1)
    srv = RunningServer(server_settings(tiny_build, versions_dir=vs.root, version_poll_s=0.1, grpc_port=0))
    try:
        vs.set_current("v9")
        end = time.time() + WAIT_S
        while not (ready := httpx.get(f"{srv.url}/readyz", timeout=30).json())["versions"]["refused"]:
            assert time.time() < end
            time.sleep(0.1)
        assert ready["status"] == "degraded" and said in ready["reasons"][-1], ready
        r = httpx.post(f"{srv.url}/v1/recommend", json={"user_id": 1}, timeout=30).json()
        assert r["model_version"] == info.model_version  # still serving v1
    finally:
        srv.stop()


def test_two_replicas_switch_after_one_promote(versions, tiny_build):
    """Two serving processes' worth of components on one versions directory: one promote, both switch (each polls
    CURRENT every 0.1 s here; the bound below is generous for a busy 2-core box: loading and warming take ~1 s)."""
    root, v1, v2 = versions
    vs = VersionStore(root)
    vs.set_current(v1)
    servers = [RunningServer(server_settings(tiny_build, versions_dir=root, version_poll_s=0.1, grpc_port=0))]
    servers.append(RunningServer(server_settings(tiny_build, versions_dir=root, version_poll_s=0.1, grpc_port=0)))
    try:
        t = time.time()
        vs.set_current(v2)
        waits = []
        for srv in servers:
            while srv.components.watcher.serving != v2:
                assert time.time() - t < WAIT_S, srv.components.watcher.describe()
                time.sleep(0.02)
            waits.append(time.time() - t)
        print(f"replicas serving {v2} after {', '.join(f'{w:.2f}' for w in waits)} s")
        answers = [httpx.post(f"{s.url}/v1/recommend", json={"user_id": 1, "k": 3}, timeout=30).json() for s in servers]
        assert {a["model_version"] for a in answers} == {vs.info(v2).model_version}
    finally:
        for srv in servers:
            srv.stop()
        vs.set_current(v1, remember=False)


def test_newcomer_path_serves_a_quick_version_then_promotes_the_full_one(tmp_path, monkeypatch):
    """`bash service/run.sh` on a fresh machine: `models quick` (a few epochs, towers and ranker only) becomes
    current at once; `models full` (every epoch of the config) is added and promoted through the gate."""
    import json as _json

    from falconrec.cli import app as cli

    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["models", "quick", "--config", "tiny"]).exit_code == 0
    vs = VersionStore(tmp_path / "versions")
    assert vs.current() == "v1" and vs.info("v1").note.startswith("quick")
    quick_root = vs.artifacts("v1") / "tiny"
    assert _json.loads((quick_root / "ranker.json").read_text())["train"]["epochs_run"] == 5
    assert not (quick_root / "sasrec.safetensors").exists()  # SASRec belongs to `falconrec eval`, not to serving
    full = CliRunner().invoke(cli, ["models", "full", "--config", "tiny"])
    assert full.exit_code == 0, full.output
    assert vs.current() == "v2" and vs.history() == ["v1"]
    assert vs.info("v2").metrics["ndcg@10"] >= vs.info("v1").metrics["ndcg@10"] - 0.005  # it passed the gate


def test_with_redis_the_pointer_is_a_redis_key(versions, tiny_build, monkeypatch):
    """With FALCONREC_REDIS_URL the current version is the Redis key every replica reads (not the CURRENT file):
    `falconrec models promote` writes it, the serving process follows it."""
    import shutil

    from exporters.redis_loader import load_redis
    from service.versions import REDIS_CURRENT
    from tests.conftest import RedisProcess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    root, v1, v2 = versions
    file_current = VersionStore(root).current()
    rp = RedisProcess()
    try:
        load_redis(rp.url, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
        monkeypatch.setenv("FALCONREC_REDIS_URL", rp.url)
        run = lambda *a: CliRunner().invoke(models_app, [*a, "--versions", str(root)])  # noqa: E731
        assert run("promote", v1, "--force").exit_code == 0
        vs = VersionStore(root, rp.url)
        assert vs.current() == v1 and rp.client().get(REDIS_CURRENT) == v1.encode()
        s = server_settings(tiny_build, versions_dir=root, version_poll_s=0.1, grpc_port=0, redis_url=rp.url)
        srv = RunningServer(s)
        try:
            assert run("promote", v2, "--force").exit_code == 0
            end = time.time() + WAIT_S
            while srv.components.watcher.serving != v2:
                assert time.time() < end, srv.components.watcher.describe()
                time.sleep(0.05)
            r = httpx.post(f"{srv.url}/v1/recommend", json={"user_id": 1, "k": 3}, timeout=30).json()
            assert r["model_version"] == vs.info(v2).model_version
            assert run("rollback").exit_code == 0 and vs.current() == v1
        finally:
            srv.stop()
    finally:
        rp.kill()
    assert VersionStore(root).current() == file_current  # the file pointer was not touched


def test_retrain_on_what_the_service_saw_lifts_a_new_item_and_swaps(tiny_build, tmp_path, monkeypatch):
    """A new item (POST /v1/items) that a group of users then interacts with: `falconrec models retrain` trains on the
    store (histories with the events, the live item), warm-started; the item gets an ID embedding of its own, ranks
    higher for those users than before, the gate's decision is printed, and the server swaps without a restart."""
    import shutil

    from exporters.redis_loader import load_redis
    from falconrec.cli import app as cli
    from service.catalog import Catalog
    from tests.conftest import RedisProcess

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    monkeypatch.chdir(tmp_path)
    rp = RedisProcess()
    load_redis(rp.url, "tiny", tiny_build.artifacts, tiny_build.repo, progress=False)
    monkeypatch.setenv("FALCONREC_REDIS_URL", rp.url)
    root = tmp_path / "versions"
    add = [
        "models",
        "add",
        "--config",
        "tiny",
        "--artifacts",
        str(tiny_build.artifacts),
        "--repo",
        str(tiny_build.repo),
    ]
    assert CliRunner().invoke(cli, [*add, "--versions", str(root)]).exit_code == 0
    assert CliRunner().invoke(cli, ["models", "promote", "v1", "--versions", str(root)]).exit_code == 0
    key = "retrain-key-0123456789abcdef"
    s = server_settings(tiny_build, versions_dir=root, version_poll_s=0.1, grpc_port=0, redis_url=rp.url,
                        api_keys=[f"write:{key}"])  # fmt: skip
    srv = RunningServer(s)
    auth = {"authorization": f"Bearer {key}"}
    new = 9_000_001
    catalog = Catalog.load(tiny_build.paths.data)
    group = sorted(catalog.user_histories)[:40]
    everything = [int(x) for x in catalog.raw_ids.tolist()] + [new]

    def mean_rank(c: httpx.Client) -> float:
        ranks = []
        for u in group:
            scores = c.post("/v1/score", json={"user_id": u, "item_ids": everything}).json()["scores"]
            mine = next(x["score"] for x in scores if x["item_id"] == new)
            ranks.append(sum(x["score"] > mine for x in scores))
        return float(np.mean(ranks))

    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            item = {"item_id": new, "text": "Ghost Road 9001 (2001) | Horror"}
            assert c.post("/v1/items", json={"items": [item]}, headers=auth).status_code == 202
            end = time.time() + WAIT_S
            while c.post("/v1/score", json={"user_id": group[0], "item_ids": [new]}).status_code != 200:
                assert time.time() < end
                time.sleep(0.2)
            for u in group:  # the new item, then two of the user's own: trained on (not the held-out last two)
                items, _ = catalog.user_histories[u]
                t = int(time.time()) - 600  # after every event of the build
                evs = [(new, t + 60), (int(items[-1]), t + 120), (int(items[-2]), t + 180)]
                body = {"events": [{"user_id": u, "item_id": i, "ts": w} for i, w in evs]}
                assert c.post("/v1/events", json=body, headers=auth).status_code == 200
            before = mean_rank(c)
            out = CliRunner().invoke(cli, ["models", "retrain", "--config", "tiny", "--versions", str(root),
                                           "--epochs", "6", "--tolerance", "1.0"])  # fmt: skip
            assert out.exit_code == 0, out.output
            assert "1 live items, 120 new events" in out.output and "current version: v2" in out.output
            assert "holdout (40 users' newest event) candidate: HR@10" in out.output
            end = time.time() + WAIT_S
            while srv.components.watcher.serving != "v2":
                assert time.time() < end, srv.components.watcher.describe()
                time.sleep(0.05)
            after = mean_rank(c)
        held = VersionStore(root).info("v2").holdout
        assert held["against"] == "v1" and held["users"] == 40 and "hr@10" in held["current"]
        retrained = Catalog.load(VersionStore(root).artifacts("v2") / "tiny" / "data.npz")
        assert 0 < retrained.to_index(np.array([new]))[0] <= retrained.num_trained  # an ID embedding of its own now
        print(f"mean rank of the new item among {len(everything)} for its 40 users: {before:.1f} -> {after:.1f}")
        assert after < before
    finally:
        srv.stop()
        rp.kill()


def test_retrain_every_takes_a_period_and_refuses_nonsense():
    import typer

    from falconrec.lifecycle import parse_period

    assert parse_period("6h") == 21_600 and parse_period("30m") == 1_800 and parse_period("1d") == 86_400
    for bad in ("6", "h", "6x", "-1h", "0s"):
        with pytest.raises(typer.BadParameter):
            parse_period(bad)


def test_build_adds_a_version_and_promotes_it_through_the_gate(tiny_build, tmp_path):
    """`falconrec build --promote` ends in a served version (no separate `models add`); `--add-version` only lists
    it. The build's steps are cached here (a copy of the session's tiny build), so this checks the wiring."""
    import shutil

    from falconrec.cli import app as cli

    art, repo, versions = tmp_path / "artifacts", tmp_path / "model_repository", tmp_path / "versions"
    shutil.copytree(tiny_build.artifacts, art)
    shutil.copytree(tiny_build.repo, repo)
    common = ["build", "--config", "tiny", "--artifacts", str(art), "--repo", str(repo), "--versions", str(versions)]
    first = CliRunner().invoke(cli, [*common, "--promote"])
    assert first.exit_code == 0, first.output
    vs = VersionStore(versions)
    assert vs.current() == "v1" and vs.info("v1").metrics.keys() == {"hr@10", "ndcg@10"}
    second = CliRunner().invoke(cli, [*common, "--add-version"])
    assert second.exit_code == 0, second.output
    assert vs.ids() == ["v1", "v2"] and vs.current() == "v1"  # listed, not served until promoted


def test_swaps_on_another_config_needs_three_of_its_versions(versions, tmp_path):
    """`falconrec swaps --config ml1m` builds nothing: a directory without three ml1m versions is refused, saying
    what it has and how to add one (the tiny versions here are not ml1m's)."""
    import shutil

    from loadtest.swaps import existing_versions

    root = tmp_path / "versions"
    shutil.copytree(versions[0], root)
    with pytest.raises(SystemExit, match=r"needs 3 versions of 'ml1m' \(has v1 \(tiny\), v2 \(tiny\)\).*--add-version"):
        existing_versions(root, "ml1m")
    with pytest.raises(SystemExit, match="needs 3 versions of 'tiny'"):  # two are not enough either
        existing_versions(root, "tiny")
