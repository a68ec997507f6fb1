"""Benchmarks (marked slow: not in CI). Run with `bash tests/run.sh -m slow -s`."""

from __future__ import annotations

import pytest

from training.bench import ranking_table, stage_breakdown


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
