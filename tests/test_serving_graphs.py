"""The forms the exporter serves equal the forms that were trained: folded input standardisation, the user
tower's last-position-only pass, candidates sharing one position/time, and the export-time parity check."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from exporters.onnx_export import RankerCandidatesGraph, check_parity, export_graph
from service.contract import RANKER_CANDIDATES, ModelDims, model_specs
from training.models import HSTURanker, ItemEmbedding, SASRec, TwoTower

DIMS = ModelDims(
    content_dim=24, tower_dim=16, max_len=40, d_model=16, num_layers=2, num_heads=2, dqk=8, dv=8, num_items=300
)


def _ranker(seed=0, heads: int | None = None) -> HSTURanker:
    torch.manual_seed(seed)
    d = DIMS if heads is None else dataclasses.replace(DIMS, num_heads=heads)
    m = HSTURanker(d.content_dim, d.num_items, d.max_len, d.d_model, d.num_layers, d.num_heads, d.dqk, d.dv, 0.0)
    with torch.no_grad():
        m.rab.pos_w.normal_(0, 0.5)
        m.rab.ts_w.normal_(0, 0.5)
    return m.eval()


@torch.no_grad()
def test_folded_standardisation_matches_unfolded():
    torch.manual_seed(0)
    emb = ItemEmbedding(24, 16, 100).eval()
    # Anisotropic like mean-pooled decoder states, harsher than SmolLM2's (|mean/std| up to ~180 here, ~12 there):
    # the fold trades a division for a cancellation, which must stay inside the export tolerance (1e-4).
    table = torch.randn(101, 24) * torch.linspace(0.2, 3.0, 24) + torch.linspace(-30, 30, 24)
    emb.set_content_stats(table)
    folded = copy.deepcopy(emb)
    folded.fold_standardisation()
    idx = torch.randint(0, 101, (64,))
    a, b = emb(table[idx], idx), folded(table[idx], idx)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(folded.proj.weight, emb.proj.weight)  # it did fold


@torch.no_grad()
def test_user_tower_last_position_pass_equals_full_pass():
    torch.manual_seed(0)
    t = TwoTower(24, 300, 40, 16, 2, 2, dropout=0.0).eval()
    x = torch.randn(3, 30, 24)
    item = torch.randint(1, 301, (3, 30))
    valid = torch.ones(3, 30)
    valid[0, :9] = 0
    full = t.user_seq(x, item, valid)[:, -1]
    last = t.user_seq(x, item, valid, last_only=True)
    assert last.shape == (3, 1, 16)
    assert torch.allclose(full, last[:, 0], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("appended", [1, 2, 50])
def test_user_tower_extended_by_appended_events_equals_a_full_recompute(appended):
    """The incremental user tower (user_tower_extend) continues the keys/values of the first P items: after 1, 2
    and 50 appended events its user vector and its keys/values equal a pass over the whole history."""
    torch.manual_seed(0)
    t = TwoTower(24, 300, 80, 16, 2, 2, dropout=0.0).eval()
    t.user_in.set_content_stats(torch.randn(301, 24) * 3 + 1)
    n = 70
    x, item, valid = torch.randn(1, n, 24), torch.randint(1, 301, (1, n)), torch.ones(1, n)
    tok = t.user_token(x, item)  # what serving gathers per item
    want_vec, want_k, want_v = t.user_state(tok, valid)
    p = n - appended
    _, past_k, past_v = t.user_state(tok[:, :p], valid[:, :p])
    vec, new_k, new_v = t.user_extend(tok[:, p:], past_k, past_v)
    assert new_k.shape == (1, 2, appended, 16)
    assert torch.allclose(vec, want_vec, atol=1e-5, rtol=0)
    assert torch.allclose(torch.cat([past_k, new_k], 2), want_k, atol=1e-5, rtol=0)
    assert torch.allclose(torch.cat([past_v, new_v], 2), want_v, atol=1e-5, rtol=0)
    # and the state's vector is the tower's serving output
    assert torch.allclose(vec, t.user_seq(x, item, valid, last_only=True)[:, -1], atol=1e-6)
    # A different past (one earlier item changed) gives a different vector: the past is really read.
    item2 = item.clone()
    item2[0, 0] = item[0, 0] % 300 + 1
    _, k2, v2 = t.user_state(t.user_token(x[:, :p], item2[:, :p]), valid[:, :p])
    assert not torch.allclose(t.user_extend(tok[:, p:], k2, v2)[0], want_vec, atol=1e-5)


@torch.no_grad()
def test_user_tower_positions_count_from_the_oldest_item():
    """Left padding does not move positions, and appending an item leaves the earlier positions' outputs as
    they were (the property extension relies on); SASRec keeps counting back from the newest."""
    torch.manual_seed(0)
    t = TwoTower(24, 300, 40, 16, 2, 2, dropout=0.0).eval()
    x, item = torch.randn(1, 12, 24), torch.randint(1, 301, (1, 12))
    padded_valid = torch.cat([torch.zeros(1, 4), torch.ones(1, 8)], 1)
    padded = t.user_seq(x, item, padded_valid)[:, 4:]
    alone = t.user_seq(x[:, 4:], item[:, 4:], torch.ones(1, 8))
    assert torch.allclose(padded, alone, atol=1e-5)
    longer = t.user_seq(x[:, 4:], item[:, 4:], torch.ones(1, 8))
    shorter = t.user_seq(x[:, 4:11], item[:, 4:11], torch.ones(1, 7))
    assert torch.allclose(longer[:, :7], shorter, atol=1e-5)
    with pytest.raises(ValueError, match="oldest"):
        SASRec(24, 300, 40, 16, 1, 1).enc.extend(
            torch.randn(1, 1, 16), torch.zeros(1, 1, 2, 16), torch.zeros(1, 1, 2, 16)
        )


@torch.no_grad()
def test_shared_candidate_position_broadcast_equals_per_candidate():
    m = _ranker()
    B, L, M = 2, 25, 33
    hist_emb, item = torch.randn(B, L, 24), torch.randint(1, 301, (B, L))
    ts = torch.sort(torch.randint(10**9, 10**9 + 10**7, (B, L)), 1)[0]
    valid = torch.ones(B, L)
    pos, qts = torch.full((B, 1), L), ts[:, -1:] + 3600
    hidden, k, v = m.history(hist_emb, item, ts, valid, qts)
    q = m.next_item_query(hidden[:, -1]).unsqueeze(1)
    cand, cand_item = torch.randn(B, M, 24), torch.randint(1, 301, (B, M))
    shared = m.candidates(k, v, q, ts, valid, cand, cand_item, pos, qts)
    each = m.candidates(k, v, q.expand(B, M, -1), ts, valid, cand, cand_item, pos.expand(B, M), qts.expand(B, M))
    assert torch.allclose(shared, each, atol=1e-6)


@pytest.mark.parametrize("heads", [1, 2])
@torch.no_grad()
def test_candidates_at_end_equal_the_trained_candidate_path(heads):
    """The serving rearrangement (bias as a key column, mask and scale on the values) gives the trained scores,
    left padding included; one head (ml1m's) has its own arrangement, without a head axis."""
    m = _ranker(heads=heads)
    B, L, M = 3, 25, 40
    hist_emb, item = torch.randn(B, L, 24), torch.randint(1, 301, (B, L))
    ts = torch.sort(torch.randint(10**9, 10**9 + 10**7, (B, L)), 1)[0]
    valid = torch.ones(B, L)
    valid[0, :7] = 0
    valid[2, :20] = 0
    qts = ts[:, -1:] + 3600
    hidden, k, v = m.history(hist_emb, item, ts, valid, qts)
    q = m.next_item_query(hidden[:, -1]).unsqueeze(1)
    token = m.item_token(torch.randn(B, M, 24), torch.randint(1, 301, (B, M)))
    trained = m.candidates(k, v, q, ts, valid, None, None, torch.full((B, 1), L), qts, cand_token=token)
    served = m.candidates_at_end(k, v, q, ts, valid, qts, token)
    assert torch.allclose(trained, served, atol=1e-5)
    assert trained.std() > 0.1  # the scores differ per candidate, so equality says something


def test_the_served_history_bias_equals_the_trained_one():
    """history(serving=True) (a constant position table, |dt| in float32, one GatherElements) gives the trained
    K, V and hidden states: left padding, equal times (dt = 0), gaps past the last bucket and a query time
    before the newest event included."""
    m = _ranker()
    with torch.no_grad():  # zero-initialised biases would make any arrangement look equal
        m.rab.pos_w.normal_()
        m.rab.ts_w.normal_()
    B, L = 3, 25
    hist_emb, item = torch.randn(B, L, 24), torch.randint(1, 301, (B, L))
    ts = torch.sort(torch.randint(10**9, 10**9 + 10**7, (B, L)), 1)[0]
    ts[1, 5:9] = ts[1, 5]  # ties
    ts[1, 0] = 0  # a gap of ~30 years: the last bucket
    valid = torch.ones(B, L)
    valid[0, :7] = 0
    qts = ts[:, -1:] + torch.tensor([[3600], [0], [-60]])
    trained = m.history(hist_emb, item, ts, valid, qts)
    served = m.history(hist_emb, item, ts, valid, qts, serving=True)
    for a, b in zip(trained, served, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    dist = torch.arange(L).unsqueeze(1) - torch.arange(L).unsqueeze(0)
    dt = torch.cat([ts[:, 1:], qts], 1).unsqueeze(2) - ts.unsqueeze(1)
    assert torch.equal(m.rab.grid(L, dt), m.rab(dist.unsqueeze(0), dt))
    assert m.rab(dist.unsqueeze(0), dt).std() > 0.5


def test_export_parity_check_fails_on_a_graph_that_differs(tmp_path):
    spec = model_specs(DIMS)[RANKER_CANDIDATES]
    ranker = _ranker()
    path = export_graph(RankerCandidatesGraph(ranker), spec, DIMS, tmp_path / "model.onnx")
    assert check_parity(RankerCandidatesGraph(ranker), path, spec, DIMS) <= 1e-4
    other = _ranker()
    with torch.no_grad():
        other.cand_head[-1].bias.add_(0.5)
    with pytest.raises(RuntimeError, match="differs from torch"):
        check_parity(RankerCandidatesGraph(other), path, spec, DIMS)
