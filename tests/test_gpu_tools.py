"""The GPU measurement's parts that run anywhere (issue 28): the open-loop generator against the real server, the
parts' split/join and integrity check, the grown catalog, the provider options, and the whole measurement as its
CPU dry run. No test needs a GPU."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from loadtest import openloop
from loadtest.gpu import pack, unpack


def test_the_open_loop_sends_without_gc_pauses():
    """The generator's own pauses would count against the server (its latency runs from the scheduled time)."""
    import gc

    with openloop.no_gc_pauses():
        assert not gc.isenabled() and gc.get_freeze_count() > 0
    assert gc.isenabled()


def test_openloop_measures_every_request_against_the_real_server(server, tiny_build):
    users = list(np.load(tiny_build.paths.data)["user_raw_ids"][:5])
    reqs = openloop.build_requests(server.url, [int(u) for u in users], k=5, num_candidates=None)
    samples, _ = asyncio.run(openloop.run(server.url, rate=40, duration_s=1.5, requests=reqs, timeout_s=10))
    s = openloop.summarize(samples, 1.5)
    assert s["sent"] == len(samples) > 20
    assert s["statuses"] == {"200": s["sent"]}
    # Server-Timing parsed per stage: the pipeline's stages, and their sum as the server time.
    assert {"queue", "user_tower", "retrieval"} <= set(s["stages_p50_p99_ms"])
    assert all(x.server_ms == pytest.approx(sum(x.stages.values())) for x in samples)
    assert s["p50_ms"] > 0


def test_openloop_keeps_why_an_answer_was_degraded(server, tiny_build):
    """A budget too small to rank: the answer comes back degraded, and the sample carries its reasons, which
    `falconrec deadline` tallies per rate."""
    from loadtest.deadline import reason_kinds

    user = int(np.load(tiny_build.paths.data)["user_raw_ids"][0])
    host = server.url.split("//")[1]
    reqs = [openloop.request_bytes(host, "/v1/recommend", {"user_id": user, "k": 5, "budget_ms": 0.3})]
    samples, _ = asyncio.run(openloop.run(server.url, rate=20, duration_s=0.5, requests=reqs, timeout_s=10))
    answered = [x for x in samples if x.status == 200]
    assert answered and all(x.degraded and x.reasons for x in answered)
    table = reason_kinds(20, samples)
    assert table.startswith("| 20 | budget: ") and table.endswith(" |"), table
    cut = [openloop.Sample(200, 5.0, 4.0, True, {}, (f"budget: ranked {m} of 1000 candidates",)) for m in (3, 5, 9)]
    assert reason_kinds(200, cut) == "| 200 | budget: ranked N of N candidates: 100.0 % (median 5 / 1000) |"


def test_deadline_reads_a_process_groups_cpu_time_across_threads():
    """`falconrec deadline`'s CPU column: /proc's user + system time of the server's process group, every thread
    counted (the model calls run on worker threads). Work on another thread of this process shows up; a group with
    no process is NaN."""
    import os
    import threading

    from loadtest.deadline import group_cpu_s

    before = group_cpu_s(os.getpgrp())

    def spin() -> None:  # until this thread has used 0.1 s of CPU: the same work on any machine's clock
        end = time.thread_time() + 0.1
        while time.thread_time() < end:
            pass

    t = threading.Thread(target=spin)
    t.start()
    t.join()
    assert group_cpu_s(os.getpgrp()) > before  # 0.1 s of CPU on another thread: ten clock ticks
    assert group_cpu_s(2**22 + 7) != group_cpu_s(2**22 + 7)  # no such group: NaN


def test_openloop_counts_a_closed_port_as_failures_not_a_crash():
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    reqs = openloop.build_requests(url, [1], k=5, num_candidates=None)
    samples, _ = asyncio.run(openloop.run(url, rate=50, duration_s=0.3, requests=reqs, timeout_s=1))
    assert samples and all(x.status == 0 for x in samples)
    assert openloop.summarize(samples, 0.3)["ok"] == 0


def test_parts_join_back_and_a_corrupt_part_is_named(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    blobs = {"provider.so.xz": rng.bytes(1000), "payload.tar.xz": rng.bytes(2500)}
    parts = pack.split(blobs, 1024, tmp_path / "parts")
    assert [p["bytes"] for p in parts] == [1024, 1024, 1024, 428]
    store = tmp_path / "store"
    monkeypatch.setattr(unpack, "STORE", store)
    unpack.receive(tmp_path / "parts" / "p1")
    with pytest.raises(SystemExit, match="last part"):  # the index travels with the last part
        unpack.joined()
    for i in (2, 4):
        unpack.receive(tmp_path / "parts" / f"p{i}")
    with pytest.raises(SystemExit, match="missing part.3"):  # not all there yet: says which
        unpack.joined()
    unpack.receive(tmp_path / "parts" / "p3")
    index, stream = unpack.joined()
    assert stream == b"".join(blobs.values())
    assert [b["name"] for b in index["blobs"]] == list(blobs)
    raw = bytearray((store / "part.2").read_bytes())
    raw[7] ^= 1
    (store / "part.2").write_bytes(bytes(raw))
    with pytest.raises(SystemExit, match="part.2 is corrupt"):
        unpack.joined()


def test_service_closure_pins_what_the_service_imports():
    pins = dict(x.split("==") for x in pack.closure(pack.SERVICE_ROOTS))
    assert {"fastapi", "pydantic-core", "faiss-cpu", "uvicorn", "starlette"} <= set(pins)
    assert "numpy" not in pins  # the GPU image's own


def test_cuda_runs_float32_unless_tf32_is_asked_for(monkeypatch):
    from service.backends import onnx

    monkeypatch.setattr(onnx.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx.choose_providers()[0] == ("CUDAExecutionProvider", {"use_tf32": "0"})
    assert onnx.choose_providers(tf32=True)[0] == ("CUDAExecutionProvider", {"use_tf32": "1"})


def test_grown_catalog_serves_more_candidates_than_the_build_had(tiny_build, tmp_path):
    import shutil

    from loadtest.gpu.grow import grow
    from service.components import build_components, close_components
    from service.contract import Manifest
    from service.pipeline.deadline import Deadline
    from service.settings import Settings

    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_build.paths.root, artifacts / "tiny")
    n = Manifest.read(tiny_build.repo).dims.num_items
    grow(artifacts, tiny_build.repo, 3 * n, "tiny-grown", tmp_path / "repo")

    async def go():
        c = await build_components(
            Settings(config="tiny-grown", artifacts_dir=artifacts, model_repository=tmp_path / "repo", grpc_port=0)
        )
        try:
            user = next(iter(c.recommender.catalog.user_histories))
            res = await c.recommender.recommend(user, None, 10, True, 2 * n, Deadline.ms(10_000))
            return res, c.retriever.size
        finally:
            await close_components(c)

    res, size = asyncio.run(go())
    assert size == 3 * n
    assert res.candidates_ranked > n and not res.degraded


def test_measurement_dry_run_on_the_cpu_provider(tiny_build, tmp_path):
    """The whole measurement, every section, as on the GPU machine but for the provider (small sizes)."""
    from loadtest.gpu import measure

    out = tmp_path / "out"
    args = [
        "--provider",
        "CPUExecutionProvider",
        "--parity-users",
        "8",
        "--latency-users",
        "4",
        "--repeat",
        "2",
        "--grow-to",
        "1200",
        "--variants",
        "1x1",
        "--variants-10k",
        "1x1",
        "--gen-procs",
        "1",
        "--rates-1k",
        "10",
        "--rates-10k",
        "5",
        "--load-seconds",
        "1",
    ]
    paths = ["--artifacts", str(tiny_build.artifacts), "--repo", str(tiny_build.repo), "--out", str(out)]
    rc = measure.main([*args, *paths, "--work", str(tmp_path / "work")])
    results = json.loads((out / "results.json").read_text())
    assert rc == 0, [v for k, v in results.items() if k.startswith("error")]
    assert results["topk_parity"]["identical_order"] == 8  # the CPU against itself: identical
    assert all(row[2] == 0.0 for row in results["graph_parity"])
    assert results["load_1000_1x1"]["rows"][0][6] == 0  # no errors
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # what comes back, nothing else


def test_deadline_tallies_refusals_and_reads_loop_lag_and_steal():
    """`falconrec deadline`'s diagnostic columns: the 503s grouped by reason (numbers masked) with their server time,
    the share of event-loop ticks later than 5 / 20 ms from two scrapes of the lag histogram, and the machine's CPU
    steal between two readings of /proc/stat."""
    from loadtest.deadline import lag_cell, reason_kinds, steal_cell
    from loadtest.openloop import Sample, refusal_detail

    shed = refusal_detail(b'{"detail": "overloaded: 7 requests queued ahead cannot finish within the budget"}')
    late = ("overloaded: no pipeline slot within the 20 ms budget (3 running, 2 waiting)",)
    samples = [
        Sample(503, 1.0, 0.1, False, {"total": 0.1}, shed),
        Sample(503, 1.2, 0.3, False, {"total": 0.3}, shed),
        Sample(503, 19.0, 18.0, False, {"total": 18.0}, late),
        Sample(200, 5.0, 4.0, False, {"queue": 1.0, "ranking": 3.0}),
    ]
    assert refusal_detail(b"not json") == () and refusal_detail(b'{"detail": 3}') == ()
    table = reason_kinds(300, samples, status=503)
    assert table == (
        "| 300 | overloaded: N requests queued ahead cannot finish within the budget: 66.7 % (server p50 0.2 ms); "
        "overloaded: no pipeline slot within the N ms budget (N running, N waiting): 33.3 % (server p50 18.0 ms) |"
    )
    before = {"0.005": 90.0, "0.02": 100.0, "+Inf": 100.0}
    after = {"0.005": 180.0, "0.02": 198.0, "+Inf": 200.0}  # 100 ticks: 10 over 5 ms, 2 of them over 20 ms
    assert lag_cell(before, after) == "10.0 % / 2.0 %"
    assert lag_cell(after, after) == "-"
    assert steal_cell([0] * 8, [60, 0, 10, 20, 0, 0, 0, 10]) == "10 %"
    assert steal_cell([], [1] * 8) == "-"
    from loadtest.deadline import row

    answers = [
        Sample(200, 5.0, 4.0, True, {}, ("budget: ranked 500 of 1000 candidates",)),
        Sample(200, 5.0, 4.0, True, {}, ("ranking failed (timed out); recall order",)),
        Sample(200, 5.0, 4.0, False, {}),
        Sample(200, 5.0, 4.0, False, {}),
    ]
    assert " 50.0 % (25.0 %) " in row(200, 1.0, answers, 0.0)  # degraded, and of all answers in recall order
    assert row(200, 1.0, answers, 0.0).endswith("| - |")
    assert row(200, 1.0, answers, 0.0, behind_s=0.0123).endswith("| 12.3 |")  # the generator's own lag
