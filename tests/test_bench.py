"""Benchmarks (marked slow: not in CI). Run with `bash tests/run.sh -m slow -s`."""

from __future__ import annotations

import pytest

from loadtest.bench import ranking_table, stage_breakdown


@pytest.mark.slow
def test_bench_prints_side_by_side(tiny_build):
    stages = stage_breakdown("tiny", tiny_build.artifacts, tiny_build.repo, requests=20)
    print(stages)
    assert stages["total (median)"] > 0
    rows = ranking_table(
        "tiny", tiny_build.artifacts, tiny_build.repo, microbatch=128, repeat=3, ms=(100, 500), ns=(32,)
    )
    for r in rows:
        print(r)
        # measured side by side in one run: caching the history beats one pass per candidate
        assert r["M-FALCON torch (ms)"] < r["pass per candidate, torch (ms)"]


def test_bench_takes_a_toml_path_and_reports_efficiency(tiny_build, tmp_path):
    """`falconrec bench --config some.toml` took the path as a folder name and crashed."""
    from loadtest.bench import efficiency_table
    from training.config import CONFIG_DIR

    toml = tmp_path / "tiny.toml"
    toml.write_text((CONFIG_DIR / "tiny.toml").read_text())
    eff = efficiency_table(str(toml), tiny_build.artifacts, tiny_build.repo, call=128, n=32, m=300, repeat=3)
    assert eff["gemm_peak_gflops"] > 0
    assert len(eff["rows"]) == 4
    full, one = eff["rows"]["user tower (n=32)"], eff["rows"]["user tower extended by 1 (n=32)"]
    # One position of 32, not all of them: its attention reads all 32 keys (a full pass's positions read 16 on
    # average), so the share is ~1/7 at tiny's widths, not 1/32; a full recompute would be >= 1.
    assert one["MFLOP"] < full["MFLOP"] / 4
    for r in eff["rows"].values():
        # FLOPs counted on the served torch graphs, time on ONNX Runtime: a rate, and a fraction of the peak
        assert r["MFLOP"] > 0 and r["ms"] > 0 and 0 < r["of peak"] == r["GFLOP/s"] / eff["gemm_peak_gflops"]


def test_index_scale_bench_grows_the_catalog_and_scores_recall(tiny_build):
    from loadtest.bench_index import index_scale_bench

    out = index_scale_bench(
        "tiny",
        tiny_build.artifacts,
        tiny_build.repo,
        items=3000,
        kinds=("flat", "ivf"),
        queries=20,
        k=50,
        log=lambda m: None,
    )
    flat, ivf = out["rows"]["flat"], out["rows"]["ivf"]
    assert flat["recall@50"] == 1.0  # exact search against itself
    assert 0.0 < ivf["recall@50"] <= 1.0 and ivf["bytes"] > 3000 * 4  # at least the vectors themselves


def test_hnsw_retrieval_recalls_the_whole_candidate_set(tmp_path):
    """FAISS HNSW returns at most efSearch (128) good neighbours: asked for 1,000 it recalled half of the exact
    top 1,000 at 1M items until the retriever raised efSearch to k."""
    import numpy as np

    from exporters.faiss_index import build_index, save_index
    from service.pipeline.retrieval import Retriever

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((20_000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(1, 20_001)
    index, kind = build_index(vecs, ids, kind="hnsw")
    save_index(index, tmp_path, kind, "v")
    q = vecs[:20] + 0.1 * rng.standard_normal((20, 32)).astype(np.float32)
    exact = np.argsort(-(q @ vecs.T), axis=1)[:, :1000] + 1
    found, _ = Retriever(tmp_path, use_gpu=False).search(q, 1000)
    recall = np.mean([len(np.intersect1d(a, b)) / 1000 for a, b in zip(found, exact, strict=True)])
    assert recall >= 0.97, recall  # efSearch 128 here: 0.84


def test_cpu_summary_names_the_instruction_set_the_kernels_pick():
    from loadtest.bench import cpu_summary

    epyc = "model name\t: AMD EPYC\nflags\t\t: fpu sse avx fma avx2 avx_vnni avx512f avx512_vnni avx512_bf16\n"
    assert cpu_summary(epyc, "1024K").startswith("AMD EPYC, ")
    assert cpu_summary(epyc, "1024K").endswith(", AVX-512 (VNNI, BF16), L2 1024K a core")
    assert cpu_summary(epyc.replace(" avx512f avx512_vnni avx512_bf16", ""), "512K").endswith(
        ", AVX2 (FMA, AVX-VNNI), L2 512K a core"
    )
    assert cpu_summary("processor\t: 0\nFeatures\t: fp asimd\n", "-").endswith(", no AVX2, L2 - a core")  # aarch64
    assert cpu_summary().count(",") >= 3  # this machine's, whatever it is
