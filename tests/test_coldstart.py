"""Cold-start evaluation: held-out items never reach training, and the experiment runs end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from training import train as T
from training.coldstart import (
    VARIANTS,
    cold_test_users,
    order_random_ties,
    pick_cold_items,
    rank_random_ties,
    run,
    without_items,
)
from training.config import load_config
from training.data import Dataset, make_synthetic


def test_held_out_items_leave_no_training_event():
    ds = make_synthetic(60, 80, seed=1)
    cold = pick_cold_items(ds.num_items, 0.1, seed=0)
    assert len(cold) == 8 and len(set(cold.tolist())) == 8
    assert np.array_equal(cold, pick_cold_items(ds.num_items, 0.1, seed=0))  # deterministic for a seed
    warm = without_items(ds, cold)
    assert not any(np.isin(s, cold).any() for s in warm.seqs)
    removed = sum(int(np.isin(s, cold).sum()) for s in ds.seqs)
    assert sum(map(len, warm.seqs)) == sum(map(len, ds.seqs)) - removed
    for s, t, ws, wt in zip(ds.seqs, ds.times, warm.seqs, warm.times, strict=True):
        keep = ~np.isin(s, cold)
        assert np.array_equal(ws, s[keep]) and np.array_equal(wt, t[keep])  # order and times kept
    users = cold_test_users(ds, cold)
    assert users and all(int(ds.seqs[u][-1]) in set(cold.tolist()) for u in users)


def test_negatives_come_from_warm_items_only():
    warm = torch.tensor([2, 3, 5, 7, 11])
    pool, pick = T.sample_negatives(100, warm, 8, torch.Generator().manual_seed(0), 1024, torch.device("cpu"))
    assert set(pool[pick].flatten().tolist()) <= set(warm.tolist())
    drawn = T.draw_items(warm, (50, 4), torch.Generator().manual_seed(0), "cpu")
    assert set(drawn.flatten().tolist()) <= set(warm.tolist())


def test_cold_start_runs_both_variants(tiny_build, tmp_path):
    ds = Dataset.load(tiny_build.paths.data)
    emb = np.load(tiny_build.paths.content_emb)
    cfg = load_config("tiny")
    cfg = dataclasses.replace(
        cfg,
        ranker=dataclasses.replace(cfg.ranker, epochs=2, eval_every=1),
        towers=dataclasses.replace(cfg.towers, epochs=2),
        coldstart=dataclasses.replace(cfg.coldstart, fraction=0.2, cascade_sizes=(50,)),
    )
    out = run(cfg, ds, emb, tmp_path, log=lambda m: None)
    assert out["held_out_items"] == 80 and out["cold_test_events"] > 0
    assert set(out["results"]) == {f"{v}: cascade top-50 -> HSTU" for v in VARIANTS}
    for m in out["results"].values():
        assert 0.0 <= m["hr@10"] <= m["hr@50"] <= 1.0 and m["users"] == out["cold_test_events"]
    assert json.loads((tmp_path / "cold_start.json").read_text())["results"] == out["results"]


def test_tied_scores_give_no_item_the_first_place():
    """An ID-only model scores all cold items alike (float32 ~20, where 1e-6 noise rounds away): a tied target
    must land anywhere among its ties, not first, and the recall cut must pick among ties at random."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.full((400,), 20.123, dtype=torch.float32)
    scores[:10] = 25.0  # ten clear winners
    ranks = np.array([rank_random_ties(scores, 200, gen) for _ in range(2000)])
    assert ranks.min() >= 10 and ranks.max() <= 399
    assert abs(ranks.mean() - (10 + 399) / 2) < 10  # uniform over the tie positions
    assert rank_random_ties(scores, 3, gen) in range(10)  # ties among the winners only
    firsts = {tuple(order_random_ties(scores, gen)[:12].tolist()) for _ in range(20)}
    assert len(firsts) > 1 and all(set(f[:10]) == set(range(10)) for f in firsts)
    untied = torch.arange(50, dtype=torch.float32)
    assert order_random_ties(untied, gen).tolist() == list(range(49, -1, -1))
    assert rank_random_ties(untied, 49, gen) == 0 and rank_random_ties(untied, 0, gen) == 49
