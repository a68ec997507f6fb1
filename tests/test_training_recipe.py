"""The training recipe and the offline evaluation: loss, negatives, batches, protocols (CPU, small data)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from service.contract import time_buckets
from training import train as T
from training.batches import PackedSequences, left_pad
from training.data import Dataset
from training.evaluate import popularity_counts, popularity_scorer
from training.metrics import rank_metrics
from training.models import HSTURanker


def _dataset(seqs: list[list[int]], num_items: int) -> Dataset:
    return Dataset(
        name="t",
        item_raw_ids=np.arange(1, num_items + 1),
        item_texts=[f"item {i}" for i in range(1, num_items + 1)],
        user_raw_ids=np.arange(len(seqs)),
        seqs=[np.array(s, np.int64) for s in seqs],
        times=[np.arange(len(s), dtype=np.int64) * 100 + 10**9 for s in seqs],
    )


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def test_loss_masks_a_negative_equal_to_the_positive():
    """With one item in the catalog every sampled negative IS the positive: masked, nothing competes."""
    g = torch.Generator().manual_seed(0)
    q = _unit(torch.randn(2, 5, 8))
    vec = _unit(torch.randn(2, 8))  # row 0 unused, row 1 = the only item
    tgt = torch.ones(2, 5, dtype=torch.long)
    loss = T.sampled_softmax(q, tgt, torch.ones(2, 5), lambda ids: vec[ids], 1, 16, 0.05, g)
    assert loss.item() < 1e-3  # unmasked it would be log(1 + 16) = 2.83


def test_loss_equals_the_masked_cross_entropy_computed_by_hand():
    N, K, temp = 4, 6, 0.1
    q = _unit(torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1)))
    vec = _unit(torch.randn(N + 1, 8, generator=torch.Generator().manual_seed(2)))
    tgt = torch.randint(1, N + 1, (3, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 4)
    mask[0, :2] = 0  # padding positions do not count
    got = T.sampled_softmax(q, tgt, mask, lambda ids: vec[ids], N, K, temp, torch.Generator().manual_seed(7))
    pool, pick = T.sample_negatives(int(mask.sum()), N, K, torch.Generator().manual_seed(7), 1024, q.device)
    qv, t = q.flatten(0, 1)[mask.flatten() > 0], tgt.flatten()[mask.flatten() > 0]
    losses = []
    for p in range(len(t)):
        negs = [int(pool[i]) for i in pick[p] if int(pool[i]) != int(t[p])]
        logits = torch.stack([qv[p] @ vec[int(t[p])]] + [qv[p] @ vec[n] for n in negs]) / temp
        losses.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(got, torch.stack(losses).mean(), atol=1e-5)


def test_full_catalog_loss_is_cross_entropy_over_every_item():
    """negatives = 0: each position's positive competes with every catalog item (or every warm one)."""
    N, temp = 7, 0.1
    q = _unit(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)))
    vec = _unit(torch.randn(N + 1, 8, generator=torch.Generator().manual_seed(2)))
    tgt = torch.tensor([[1, 4, 7], [2, 2, 5]])
    mask = torch.tensor([[0.0, 1, 1], [1, 1, 1]])
    got = T.sampled_softmax(q, tgt, mask, lambda ids: vec[ids], N, 0, temp, torch.Generator())
    sel = mask.flatten() > 0
    want = F.cross_entropy(q.flatten(0, 1)[sel] @ vec[1:].T / temp, tgt.flatten()[sel] - 1)
    assert torch.allclose(got, want, atol=1e-6)
    warm = torch.tensor([2, 4, 5, 7])  # a cold-start run: held-out items are never negatives
    cols = {2: 0, 4: 1, 5: 2, 7: 3}
    keep = sel & torch.tensor([int(x) in cols for x in tgt.flatten()])
    want_warm = F.cross_entropy(
        q.flatten(0, 1)[keep] @ vec[warm].T / temp, torch.tensor([cols[int(x)] for x in tgt.flatten()[keep]])
    )
    mask_warm = mask * torch.tensor([[int(x) in cols for x in row] for row in tgt.tolist()])
    got_warm = T.sampled_softmax(q, tgt, mask_warm, lambda ids: vec[ids], warm, 0, temp, torch.Generator())
    assert torch.allclose(got_warm, want_warm, atol=1e-6)
    with pytest.raises(ValueError, match="not in the training catalog"):
        T.sampled_softmax(q, tgt, torch.ones(2, 3), lambda ids: vec[ids], warm, 0, temp, torch.Generator())


def test_negatives_are_drawn_per_position():
    pool, pick = T.sample_negatives(50, 1000, 16, torch.Generator().manual_seed(0), 256, torch.device("cpu"))
    negs = pool[pick]  # [50, 16] item ids
    assert negs.min() >= 1 and negs.max() <= 1000
    assert len({tuple(r.tolist()) for r in negs}) == 50  # every position has its own set
    small_pool, _ = T.sample_negatives(5, 300, 16, torch.Generator().manual_seed(0), 1024, torch.device("cpu"))
    assert small_pool.tolist() == list(range(1, 301))  # a small catalog is sampled from in full


def test_shared_negatives_score_every_position_against_the_whole_pool():
    """negatives >= negative_pool: one pool of uniform draws is every position's negatives (a single matmul); the
    positive, wherever it sits in the pool, is masked there and counted once."""
    N, K, temp = 50, 8, 0.1
    q = _unit(torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)))
    vec = _unit(torch.randn(N + 1, 8, generator=torch.Generator().manual_seed(2)))
    tgt = torch.randint(1, N + 1, (2, 3), generator=torch.Generator().manual_seed(3))
    got = T.sampled_softmax(
        q, tgt, torch.ones(2, 3), lambda ids: vec[ids], N, K, temp, torch.Generator().manual_seed(7), K
    )
    pool, pick = T.sample_negatives(6, N, K, torch.Generator().manual_seed(7), K, q.device)
    assert pick is None and len(pool) == K
    qv, t = q.flatten(0, 1), tgt.flatten()
    losses = []
    for p in range(6):
        negs = [int(n) for n in pool if int(n) != int(t[p])]
        logits = torch.stack([qv[p] @ vec[int(t[p])]] + [qv[p] @ vec[n] for n in negs]) / temp
        losses.append(-torch.log_softmax(logits, 0)[0])
    assert torch.allclose(got, torch.stack(losses).mean(), atol=1e-5)


def test_ranker_precision_is_checked():
    from training.config import RankerCfg

    assert RankerCfg(precision="bf16").precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        RankerCfg(precision="fp16")


def test_packed_windows_equal_left_pad_of_the_same_slice():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=n) for n in (1, 3, 7, 12, 30)]
    times = [np.arange(len(s)) + 1000 for s in seqs]
    packed = PackedSequences(seqs, times)
    users = np.array([4, 0, 2, 3, 1, 4])
    w, wt, wv = packed.windows(users, 8, np.random.default_rng(1))
    for row, u in enumerate(users):
        n = int(wv[row].sum())
        got = w[row, 8 - n :]
        s = seqs[u]
        # a contiguous slice of the user's sequence, as long as the window allows
        assert n == min(len(s), 8)
        starts = [a for a in range(len(s) - n + 1) if np.array_equal(s[a : a + n], got)]
        assert starts, (u, got, s)
        ref, ref_valid = left_pad([s[starts[0] : starts[0] + n]], 8)
        assert np.array_equal(ref[0], w[row]) and np.array_equal(ref_valid[0], wv[row])
        assert np.array_equal(wt[row, 8 - n :], times[u][starts[0] : starts[0] + n])


def test_length_batches_cover_every_user_once():
    lengths = np.random.default_rng(0).integers(3, 300, size=1000)
    batches = T.length_batches(lengths, 64, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < np.ptp(lengths) / 4  # similar lengths together: padding is mostly trimmed


def test_seen_filter_excludes_exactly_the_history():
    # user 0: history 1,2,3 (test target 4); user 1: history 5,1 (test target 2)
    ds = _dataset([[1, 2, 3, 4], [5, 1, 2]], num_items=6)
    table = torch.zeros(7, 3)

    def scores(h):  # item 1 best, then 2, 3, ... (column i = item i+1)
        return torch.arange(6, 0, -1, dtype=torch.float32).expand(len(h[4]), -1).clone()

    ranks = T.scorer_ranks(ds, [0, 1], "test", 4, table, scores)
    # unfiltered: user 0's target 4 has items 1,2,3 above; user 1's target 2 has item 1 above
    assert ranks[False].tolist() == [3, 1]
    # paper protocol: user 0's history {1,2,3} and user 1's {5,1} are not ranked: nothing above either target
    assert ranks[True].tolist() == [0, 0]
    r, c = T.seen_mask_index(ds, [0, 1], "test", np.array([4, 2]))
    assert sorted(zip(r.tolist(), (c + 1).tolist(), strict=True)) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 5)]


def test_popularity_row_matches_a_count():
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(np.arange(1, 21))[: rng.integers(3, 15)].tolist() for _ in range(40)]
    ds = _dataset(seqs, num_items=20)
    counts = Counter(i for s in seqs for i in s[:-1])  # test protocol: everything but each user's last item
    want = np.array([counts[i] for i in range(1, 21)])
    assert np.array_equal(popularity_counts(ds), want)
    ranks = T.scorer_ranks(ds, list(range(40)), "test", 16, torch.zeros(21, 2), popularity_scorer(want, "cpu"))
    for u, s in enumerate(seqs):
        target = s[-1]
        above = [i for i in range(1, 21) if (want[i - 1], -i) > (want[target - 1], -target)]
        assert ranks[False][u] == len(above)
        assert ranks[True][u] == len([i for i in above if i not in s[:-1]])
    m = rank_metrics(ranks[True])
    assert m["users"] == 40


def test_history_time_bias_counts_to_the_next_event():
    """Only the newest position's bias depends on the query time, and only through its log-time buckets."""
    torch.manual_seed(0)
    m = HSTURanker(8, 30, 16, 8, 2, 1, 8, 8, dropout=0.0).eval()
    with torch.no_grad():
        m.rab.ts_w.normal_()
    item = torch.randint(1, 31, (1, 6))
    ts = torch.tensor([[10**9 + 100 * i for i in range(6)]])
    valid = torch.ones(1, 6)
    with torch.no_grad():
        h1, k1, v1 = m.history(torch.zeros(1, 6, 8), item, ts, valid, ts[:, -1:] + 10)
        h2, k2, v2 = m.history(torch.zeros(1, 6, 8), item, ts, valid, ts[:, -1:] + 10**6)
    assert torch.allclose(h1[:, :-1], h2[:, :-1])  # older positions count to the next event, not the query
    assert not torch.allclose(h1[:, -1], h2[:, -1])
    assert torch.allclose(k1[:, 0], k2[:, 0])  # first-layer K never sees the time
    later = ts[:, -1:] + 9  # 1 s earlier than the first query: the same log-time bucket for every history event
    assert np.array_equal(time_buckets((later - ts).numpy(), 64), time_buckets((ts[:, -1:] + 10 - ts).numpy(), 64))
    with torch.no_grad():
        h3, _, _ = m.history(torch.zeros(1, 6, 8), item, ts, valid, later)
    assert torch.allclose(h1, h3)  # what lets the service reuse cached K/V across requests


@pytest.mark.parametrize("n", [1, 5])
def test_abs_positions_ignore_left_padding(n):
    torch.manual_seed(0)
    m = HSTURanker(8, 30, 16, 8, 1, 1, 8, 8, dropout=0.0).eval()
    emb, item = torch.randn(1, 4, 8), torch.randint(1, 31, (1, 4))
    ts, q = torch.arange(4).unsqueeze(0) * 100 + 10**9, torch.tensor([[10**9 + 1000]])
    pad = lambda x, v: torch.cat([torch.full((1, n, *x.shape[2:]), v, dtype=x.dtype), x], 1)  # noqa: E731
    with torch.no_grad():
        a, _, _ = m.history(emb, item, ts, torch.ones(1, 4), q)
        b, _, _ = m.history(pad(emb, 0.0), pad(item, 0), pad(ts, 0), pad(torch.ones(1, 4), 0.0), q)
    assert torch.allclose(a, b[:, n:], atol=1e-6)


def test_reranked_validation_scores_equal_the_full_scores_on_the_first_stage_top_n():
    """The ranker's cheaper validation keeps the full score of the next-item score's top n unseen items."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ds = _dataset([rng.permutation(np.arange(1, 41))[: rng.integers(4, 12)].tolist() for _ in range(6)], 40)
    m = HSTURanker(8, 40, 16, 8, 2, 1, 8, 8, dropout=0.0).eval()
    table = T.content_table(rng.standard_normal((40, 8)).astype(np.float16))
    hist = T.history_tensors(ds, list(range(6)), "valid", 16, table)
    full = T.ranker_scores_full(m, hist, table)
    got = T.ranker_scores_reranked(m, hist, table, top_n=7)
    kept = torch.isfinite(got)
    assert kept.sum(1).tolist() == [7] * 6
    assert torch.allclose(got[kept], full[kept], atol=1e-5)
    item, valid = hist[1], hist[3]
    for u in range(6):  # the history items are never among the n
        seen = item[u][valid[u] > 0] - 1
        assert not kept[u, seen].any()


@pytest.mark.parametrize("holdout", ["all", "valid_users"])
def test_training_never_sees_a_validation_users_validation_item(holdout):
    from training.config import BuildConfig, DataCfg
    from training.data import make_synthetic

    ds = make_synthetic(num_users=1500, num_items=80, seed=2)
    cfg = BuildConfig(name="t", data=DataCfg(valid_holdout=holdout))
    batcher = T._batcher(cfg, ds, torch.device("cpu"))
    vusers = set(T._valid_users(ds, cfg.seed))
    assert len(vusers) == T.VALID_USERS
    for u in range(ds.num_users):
        n = int(batcher.packed.lengths[u])
        # validation users always stop before their validation item; the others only under "all"
        expect = len(ds.seqs[u]) - (2 if u in vusers or holdout == "all" else 1)
        assert n == expect, (u, n, expect)
        w, _, wv = batcher.packed.windows(np.array([u]), n, np.random.default_rng(0))
        assert w[0, wv[0] > 0].tolist() == ds.seqs[u][:expect].tolist()


def test_a_bad_valid_holdout_is_refused_by_name():
    from training.config import DataCfg

    with pytest.raises(ValueError, match="valid_holdout"):
        DataCfg(valid_holdout="everyone")


def test_target_position_rows_score_as_each_candidate_at_its_own_position():
    """The ranker step groups candidates by target position ([B*S, C] rows sharing one position and time);
    the scores equal those of a [B, S*C] call where every candidate carries its own position and time."""
    torch.manual_seed(0)
    m = HSTURanker(8, 40, 16, 8, 2, 1, 8, 8, dropout=0.0).eval()
    with torch.no_grad():
        m.rab.ts_w.normal_()
        m.rab.pos_w.normal_()
    table = torch.randn(41, 8)
    B, L, S, C = 3, 10, 2, 5
    item = torch.randint(1, 41, (B, L))
    ts = torch.cumsum(torch.randint(1, 10**5, (B, L)), 1) + 10**9
    valid = torch.ones(B, L)
    valid[0, :4] = 0
    pos_t = torch.tensor([[10, 6], [10, 3], [10, 8]])
    cand = torch.randint(1, 41, (B, S, C))
    with torch.no_grad(), T.training_catalog(m, table):
        hidden, k, v = m.history(None, item, ts, valid, ts[:, -1:] + 50)
        q_at = m.next_item_query(hidden).gather(1, (pos_t - 1).unsqueeze(-1).expand(B, S, 8))
        ts_t = torch.where(pos_t < L, ts.gather(1, pos_t.clamp(max=L - 1)), ts[:, -1:] + 50)
        got = T.target_position_scores(m, k, v, q_at, ts, valid, cand, pos_t, ts_t)
        each = m.candidates(
            k,
            v,
            q_at.unsqueeze(2).expand(B, S, C, 8).reshape(B, S * C, 8),
            ts,
            valid,
            None,
            cand.reshape(B, S * C),
            pos_t.unsqueeze(-1).expand(B, S, C).reshape(B, S * C),
            ts_t.unsqueeze(-1).expand(B, S, C).reshape(B, S * C),
        ).reshape(B, S, C)
    assert torch.allclose(got, each, atol=1e-5)
    assert not torch.allclose(got[:, 0], got[:, 1])  # positions differ: the rows are not all the same


def test_dropout_keeps_the_expectation_and_is_seeded():
    from training.models import Dropout

    x = torch.ones(64, 100, 50)
    torch.manual_seed(3)
    a = Dropout(0.2).train()(x)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.8) < 0.01
    assert torch.allclose(a[a != 0], torch.full_like(a[a != 0], 1 / 0.8))
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.2).train()(x), a)  # same torch seed, same mask
    assert torch.equal(Dropout(0.2).eval()(x), x)


def test_standardised_catalog_follows_new_statistics():
    from training.models import ItemEmbedding

    torch.manual_seed(0)
    emb = ItemEmbedding(6, 4, 9)
    table = torch.randn(10, 6) * 5 + 2
    idx = torch.tensor([[1, 2, 9]])
    with torch.no_grad(), emb.training_catalog(table):
        before = emb(None, idx, dropout=False)
        emb.set_content_stats(table)
        after = emb(None, idx, dropout=False)
        direct = emb.proj((table[idx] - emb.content_mean) / emb.content_std) + emb.ids(idx)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, direct, atol=1e-6)


def test_an_inference_mode_catalog_is_embedded_without_the_cache():
    """`falconrec eval` builds its table under inference mode (no version counter to key a cache on)."""
    from training.models import ItemEmbedding

    torch.manual_seed(0)
    emb = ItemEmbedding(6, 4, 9)
    with torch.inference_mode():
        table = torch.randn(10, 6)
        emb.set_content_stats(table)
        idx = torch.tensor([[3, 1]])
        with emb.training_catalog(table):
            got = emb(None, idx, dropout=False)
        want = emb.proj((table[idx] - emb.content_mean) / emb.content_std) + emb.ids(idx)
    assert torch.allclose(got, want, atol=1e-6)


def test_the_cache_built_during_validation_still_trains():
    """Validation (inference mode) may embed the catalog first; the next training step must backpropagate."""
    from training.models import ItemEmbedding

    torch.manual_seed(0)
    emb = ItemEmbedding(6, 4, 9)
    table = torch.randn(10, 6)
    emb.set_content_stats(table)
    idx = torch.tensor([[3, 1]])
    with emb.training_catalog(table):
        with torch.inference_mode():
            emb(None, idx, dropout=False)
        emb(None, idx, dropout=False).sum().backward()
    assert emb.proj.weight.grad is not None and emb.proj.weight.grad.abs().sum() > 0
