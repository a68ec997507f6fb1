"""M-FALCON properties of the HSTU ranker (torch): candidate isolation and cached == one pass."""

from __future__ import annotations

import pytest
import torch

from training.models import HSTURanker, one_pass


@pytest.fixture(scope="module")
def ranker():
    torch.manual_seed(0)
    m = HSTURanker(
        content_dim=24, num_items=800, max_len=40, d_model=16, num_layers=2, num_heads=2, dqk=8, dv=8, dropout=0.0
    ).eval()
    # Non-zero relative biases, so the test would catch position/time mistakes.
    with torch.no_grad():
        m.rab.pos_w.normal_(0, 0.5)
        m.rab.ts_w.normal_(0, 0.5)
    return m


def _inputs(B=2, L=25, M=501, seed=1):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(801, 24, generator=g)
    item = torch.randint(1, 801, (B, L), generator=g)
    item[0, :7] = 0  # left padding in one row
    valid = (item > 0).float()
    ts = torch.sort(torch.randint(10**9, 10**9 + 10**7, (B, L), generator=g), 1)[0]
    q = ts[:, -1:] + 3600
    cand = torch.randint(1, 801, (B, M), generator=g)
    return table, item, ts, valid, q, cand


@torch.no_grad()
def test_candidate_score_alone_equals_among_500_others(ranker):
    table, item, ts, valid, q, cand = _inputs()
    among = ranker.score_full(table[item], item, ts, valid, q, table[cand], cand)
    for j in (0, 250, 500):
        alone = ranker.score_full(table[item], item, ts, valid, q, table[cand[:, j : j + 1]], cand[:, j : j + 1])
        assert torch.allclose(alone[:, 0], among[:, j], atol=1e-5), (alone[:, 0], among[:, j])


@torch.no_grad()
def test_cached_microbatches_equal_one_pass_with_mask(ranker):
    table, item, ts, valid, q, cand = _inputs(M=60)
    reference = one_pass(ranker, table[item], item, ts, valid, q, table[cand], cand, mask="falcon")
    hidden, k, v = ranker.history(table[item], item, ts, valid, q)  # once
    hq = ranker.next_item_query(hidden[:, -1])
    B, L = item.shape
    parts = []
    for a in range(0, cand.shape[1], 16):  # microbatches of b_m = 16
        c = cand[:, a : a + 16]
        pos = torch.full(c.shape, L, dtype=torch.int64)
        parts.append(
            ranker.candidates(
                k, v, hq.unsqueeze(1).expand(B, c.shape[1], -1), ts, valid, table[c], c, pos, q.expand_as(c)
            )
        )
    cached = torch.cat(parts, 1)
    assert torch.allclose(cached, reference, atol=1e-5), (cached - reference).abs().max()


@torch.no_grad()
def test_naive_causal_mask_is_not_batch_invariant(ranker):
    """The control: with a plain causal mask a candidate's score depends on the candidates before it."""
    table, item, ts, valid, q, cand = _inputs(M=40)
    naive = one_pass(ranker, table[item], item, ts, valid, q, table[cand], cand, mask="causal")
    falcon = one_pass(ranker, table[item], item, ts, valid, q, table[cand], cand, mask="falcon")
    assert torch.allclose(naive[:, 0], falcon[:, 0], atol=1e-5)  # first candidate sees no other
    assert (naive[:, 1:] - falcon[:, 1:]).abs().max() > 1e-3


@torch.no_grad()
def test_left_padding_does_not_change_scores(ranker):
    table, item, ts, valid, q, cand = _inputs(B=1, M=30)
    item, ts, valid = item[:, 10:], ts[:, 10:], valid[:, 10:]
    base = ranker.score_full(table[item], item, ts, valid, q, table[cand], cand)
    pad = 9
    item_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), item], 1)
    ts_p = torch.cat([torch.zeros(1, pad, dtype=torch.long), ts], 1)
    valid_p = torch.cat([torch.zeros(1, pad), valid], 1)
    padded = ranker.score_full(table[item_p], item_p, ts_p, valid_p, q, table[cand], cand)
    assert torch.allclose(base, padded, atol=1e-5)
