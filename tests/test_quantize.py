"""int8 weight matmuls (exporters/quantize.py): the Gemm rewrite is exact, the int8 graph is int8 and close to fp32,
the build keeps it only behind its quality check (fp32 beside it, restored on failure), and the service serves it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters import quantize as Q
from exporters.triton_config import parse
from service.contract import (
    FP32_ONNX_FILE,
    MANIFEST,
    QUANTIZATION_REPORT,
    RANKER_CANDIDATES,
    RANKER_HISTORY,
    Manifest,
    fp32_onnx_path,
    onnx_path,
)
from tests.conftest import RunningServer, server_settings


@pytest.fixture()
def repo(tiny_build, tmp_path) -> Path:
    """A copy of the tiny build's repository: these tests rewrite graphs in place."""
    dst = tmp_path / "model_repository"
    shutil.copytree(tiny_build.repo, dst)
    return dst


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _candidate_inputs(repo: Path, m: int = 64) -> dict[str, np.ndarray]:
    """A real history pass's K/V and m candidate tokens: the inputs the service gives ranker_candidates."""
    dims = Manifest.read(repo).dims
    rng = np.random.default_rng(0)
    n = dims.max_len
    hist = {
        "hist_token": rng.standard_normal((1, n, dims.d_model)).astype(np.float32),
        "hist_ts": np.sort(rng.integers(10**9, 10**9 + 10**7, size=(1, n))).astype(np.int64),
        "hist_valid": np.ones((1, n), np.float32),
        "query_ts": np.full((1, 1), 10**9 + 2 * 10**7, np.int64),
    }
    k, v, q = _session(onnx_path(repo, RANKER_HISTORY)).run(None, hist)
    tokens = rng.standard_normal((1, m, dims.d_model)).astype(np.float32)
    return {"hist_k": k, "hist_v": v, "hist_q": q, "hist_ts": hist["hist_ts"], "hist_valid": hist["hist_valid"],
            "query_ts": hist["query_ts"], "cand_token": tokens}  # fmt: skip


def _float_weight_columns(model: onnx.ModelProto) -> list[int]:
    """The output columns (N) of each Gemm or MatMul whose weight is a float32 initializer: the fp32 products."""
    inits = {i.name: i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    out = []
    for n in model.graph.node:
        if n.op_type in ("Gemm", "MatMul") and n.input[1] in inits:
            trans = any(a.name == "transB" and a.i for a in n.attribute)
            out.append(list(inits[n.input[1]].dims)[0 if trans else 1])
    return out


def test_the_gemm_rewrite_keeps_the_graphs_outputs(repo, tmp_path):
    folded, plain = tmp_path / "folded.onnx", tmp_path / "plain.onnx"
    Q._constant_folded(onnx_path(repo, RANKER_CANDIDATES), folded)
    model = onnx.load(str(folded))
    assert Q.gemms_as_matmuls(model) > 0
    assert [n.op_type for n in model.graph.node].count("Gemm") == 1  # the candidate head's matrix-vector product
    assert _float_weight_columns(model).count(1) == 1
    onnx.save(model, str(plain))
    feeds = _candidate_inputs(repo)
    want = _session(onnx_path(repo, RANKER_CANDIDATES)).run(None, feeds)[0]
    got = _session(plain).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_int8_repository_is_int8_and_close_to_fp32(repo, tmp_path):
    out = tmp_path / "int8"
    manifest = Q.write_quantized_repository(repo, out, (RANKER_CANDIDATES,))
    assert manifest.int8 == [RANKER_CANDIDATES]
    assert manifest.model_version == Manifest.read(repo).model_version  # towers, index and K/V are the same
    int8_model = onnx.load(str(onnx_path(out, RANKER_CANDIDATES)))
    assert [n.op_type for n in int8_model.graph.node].count("MatMulInteger") > 0
    assert _float_weight_columns(int8_model) == [1]  # fp32 only where int8 cost more than it saved
    # Its fp32 origin beside it, named by Triton's config (a GPU runs that one).
    assert fp32_onnx_path(out, RANKER_CANDIDATES).read_bytes() == onnx_path(repo, RANKER_CANDIDATES).read_bytes()
    assert parse((out / RANKER_CANDIDATES / "config.pbtxt").read_text()).default_model_filename == FP32_ONNX_FILE
    with pytest.raises(ValueError, match="inside it"):
        Q.write_quantized_repository(repo, repo / "int8", (RANKER_CANDIDATES,))
    # The other graphs are untouched.
    assert onnx_path(out, RANKER_HISTORY).read_bytes() == onnx_path(repo, RANKER_HISTORY).read_bytes()
    feeds = _candidate_inputs(repo)
    fp32 = _session(onnx_path(repo, RANKER_CANDIDATES)).run(None, feeds)[0]
    int8 = _session(onnx_path(out, RANKER_CANDIDATES)).run(None, feeds)[0]
    diff = np.abs(int8 - fp32).max()
    assert 0 < diff < 0.05 * np.abs(fp32).max()  # quantized (not the same graph), and close


def test_the_build_keeps_int8_only_behind_its_check_with_fp32_beside(repo, tiny_build, monkeypatch):
    original = onnx_path(repo, RANKER_CANDIDATES).read_bytes()
    check = Q.apply_int8("tiny", tiny_build.artifacts, repo, (RANKER_CANDIDATES,))
    assert check is not None and check.passed, check
    assert Manifest.read(repo).int8 == [RANKER_CANDIDATES]
    assert fp32_onnx_path(repo, RANKER_CANDIDATES).read_bytes() == original
    assert onnx_path(repo, RANKER_CANDIDATES).read_bytes() != original
    # Triton may place the model on a GPU, where the int8 kernels fall back to the CPU: it serves the fp32 graph.
    config = parse((repo / RANKER_CANDIDATES / "config.pbtxt").read_text())
    assert config.default_model_filename == FP32_ONNX_FILE
    report = json.loads((repo / QUANTIZATION_REPORT).read_text())
    assert report["passed"] and report["users"] == check.users and report["models"] == [RANKER_CANDIDATES]

    # Applied again (a rebuild): quantized from the fp32 graph, not from the int8 one.
    again = onnx_path(repo, RANKER_CANDIDATES).read_bytes()
    Q.apply_int8("tiny", tiny_build.artifacts, repo, (RANKER_CANDIDATES,))
    assert onnx_path(repo, RANKER_CANDIDATES).read_bytes() == again
    assert fp32_onnx_path(repo, RANKER_CANDIDATES).read_bytes() == original

    # A swap cut short before the manifest was written: the files say what is int8, and fp32 comes back.
    (repo / MANIFEST).write_text(json.dumps({**json.loads((repo / MANIFEST).read_text()), "int8": []}))
    Q.restore_fp32(repo)
    assert onnx_path(repo, RANKER_CANDIDATES).read_bytes() == original
    assert not fp32_onnx_path(repo, RANKER_CANDIDATES).exists() and not (repo / QUANTIZATION_REPORT).exists()
    Q.apply_int8("tiny", tiny_build.artifacts, repo, (RANKER_CANDIDATES,))

    # A check that fails leaves the repository in fp32 and says so.
    monkeypatch.setattr(Q, "MIN_TOP10_OVERLAP", 1.01)
    check = Q.apply_int8("tiny", tiny_build.artifacts, repo, (RANKER_CANDIDATES,))
    assert check is not None and not check.passed
    assert onnx_path(repo, RANKER_CANDIDATES).read_bytes() == original
    assert Manifest.read(repo).int8 == []
    assert parse((repo / RANKER_CANDIDATES / "config.pbtxt").read_text()).default_model_filename == ""
    assert json.loads((repo / QUANTIZATION_REPORT).read_text())["passed"] is False


def test_the_service_serves_an_int8_repository(repo, tiny_build, tmp_path):
    out = tmp_path / "int8"
    Q.write_quantized_repository(repo, out, (RANKER_CANDIDATES,))
    assert json.loads((out / MANIFEST).read_text())["int8"] == [RANKER_CANDIDATES]
    srv = RunningServer(server_settings(tiny_build, model_repository=out))
    try:
        assert srv.components.manifest.int8 == [RANKER_CANDIDATES]
        user = next(iter(srv.components.recommender.catalog.user_histories))
        r = httpx.post(f"{srv.url}/v1/recommend", json={"user_id": int(user), "k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["items"]) == 5 and not body.get("degraded")
    finally:
        srv.stop()


def test_the_config_names_quantizable_graphs_only():
    from training.config import ServeCfg

    assert ServeCfg(int8=["ranker_candidates"]).int8 == (RANKER_CANDIDATES,)
    with pytest.raises(ValueError, match="unknown graphs"):
        ServeCfg(int8=["item_tower"])
    with pytest.raises(ValueError, match="go together"):
        ServeCfg(int8=["user_tower"])


def test_an_int8_graph_without_its_fp32_origin_is_an_error(repo, tmp_path):
    out = tmp_path / "int8"
    Q.write_quantized_repository(repo, out, (RANKER_CANDIDATES,))
    fp32_onnx_path(out, RANKER_CANDIDATES).unlink()
    with pytest.raises(RuntimeError, match="without their fp32 origin"):
        Q.restore_fp32(out)


def test_the_build_step_follows_the_config_both_ways(tiny_build, tmp_path):
    """int8 on, off, on again: each build leaves the repository the config asks for (the second 'on' must not be
    taken as up to date from the first: the export in between wrote fp32 graphs)."""
    import dataclasses

    from falconrec.build import Builder
    from training.config import load_config

    artifacts, repo = tmp_path / "artifacts", tmp_path / "model_repository"
    shutil.copytree(tiny_build.artifacts, artifacts)
    shutil.copytree(tiny_build.repo, repo)
    base = load_config("tiny")
    on = dataclasses.replace(base, serve=dataclasses.replace(base.serve, int8=(RANKER_CANDIDATES,)))
    for cfg, want in ((on, [RANKER_CANDIDATES]), (base, []), (on, [RANKER_CANDIDATES])):
        results = Builder(cfg, artifacts, repo, log=lambda m: None).build()
        assert Manifest.read(repo).int8 == want
        assert fp32_onnx_path(repo, RANKER_CANDIDATES).exists() == bool(want)
        assert (repo / QUANTIZATION_REPORT).exists() == bool(want)
        if want:
            assert [r.name for r in results][-1] == "int8"
            ops = [n.op_type for n in onnx.load(str(onnx_path(repo, RANKER_CANDIDATES))).graph.node]
            assert "MatMulInteger" in ops


def test_a_gpu_session_loads_the_fp32_origin_of_an_int8_graph(repo, tmp_path):
    from service.backends.onnx import graph_file

    out = tmp_path / "int8"
    Q.write_quantized_repository(repo, out, (RANKER_CANDIDATES,))
    assert graph_file(out, RANKER_CANDIDATES, "CPUExecutionProvider") == onnx_path(out, RANKER_CANDIDATES)
    for gpu in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        assert graph_file(out, RANKER_CANDIDATES, gpu) == fp32_onnx_path(out, RANKER_CANDIDATES)
        assert graph_file(out, RANKER_HISTORY, gpu) == onnx_path(out, RANKER_HISTORY)  # fp32 only: as it is
