"""`falconrec cold-start`: can the served cascade recommend items it never saw an interaction of?

That is LEARN's claim for LLM content embeddings. A random fraction of the catalog is held out of training
entirely: every event with such an item is removed from every user's sequence, and those items are not
drawn as negatives either, so no ID embedding is learned for them. Two variants train on the rest:
"content + ID" (ours) and "ID only" (the same models with the content embeddings zeroed). Evaluation takes
the test events (each user's last item) whose target is a held-out item, as the service would see them: the
held-out items carry no ID (index 0, as for an item added after the build) but keep their text's embedding.
It reports HR@10 / NDCG@10 of the cascade (towers top-N -> HSTU ranker -> top 10) at each N, on the paper's
protocol (the user's history not ranked), ties broken at random (an ID-only model cannot tell cold items
apart: counting ties in its favour would flatter it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from training import train as T
from training.batches import left_pad
from training.config import BuildConfig
from training.data import Dataset
from training.metrics import rank_metrics
from training.models import HSTURanker, TwoTower

VARIANTS = ("content + ID (ours)", "ID only")


def pick_cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids (1..N) of the held-out items: a uniform draw of round(fraction * N)."""
    rng = np.random.default_rng(seed + 7)
    n = int(round(fraction * num_items))
    return np.sort(rng.choice(np.arange(1, num_items + 1), size=n, replace=False)).astype(np.int64)


def without_items(ds: Dataset, cold: np.ndarray) -> Dataset:
    """The same users with every event of a `cold` item removed (what the cold-start models train on)."""
    keep = [~np.isin(s, cold) for s in ds.seqs]
    return Dataset(
        name=f"{ds.name}-warm",
        item_raw_ids=ds.item_raw_ids,
        item_texts=ds.item_texts,
        user_raw_ids=ds.user_raw_ids,
        seqs=[s[k] for s, k in zip(ds.seqs, keep, strict=True)],
        times=[t[k] for t, k in zip(ds.times, keep, strict=True)],
    )


def cold_test_users(ds: Dataset, cold: np.ndarray) -> list[int]:
    """Users whose test target is a held-out item and who have at least two earlier events."""
    return [u for u in range(ds.num_users) if len(ds.seqs[u]) >= 3 and int(ds.seqs[u][-1]) in set(cold.tolist())]


def order_random_ties(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Indices of `scores` from best to worst, equal scores in random order. (Adding a small noise does not do
    it: float32 scores of magnitude ~20 are spaced ~2e-6 apart, so 1e-6 noise rounds away and exact ties stay.)"""
    perm = torch.randperm(len(scores), generator=gen)
    return perm[torch.argsort(scores[perm], descending=True, stable=True)]


def rank_random_ties(scores: torch.Tensor, target: int, gen: torch.Generator) -> int:
    """0-based rank of scores[target], the items that tie with it placed before it in a random number."""
    ahead = int((scores > scores[target]).sum())
    ties = int((scores == scores[target]).sum()) - 1
    return ahead + int(torch.randint(0, ties + 1, (1,), generator=gen)) if ties else ahead


@torch.inference_mode()
def cascade_ranks_cold(
    ds: Dataset,
    users: list[int],
    table: torch.Tensor,
    towers: TwoTower,
    ranker: HSTURanker,
    cold: np.ndarray,
    sizes: tuple[int, ...],
    max_len: int,
    seed: int = 0,
    batch: int = 32,
) -> dict[int, np.ndarray]:
    """Rank of each user's (held-out) test target in the cascade's top-N ordering, per N; misses of recall
    rank after every recalled item. Held-out items have index 0 (no ID), their content kept."""
    gen = torch.Generator().manual_seed(seed)
    N = table.shape[0] - 1
    ids = torch.arange(1, N + 1)
    served_idx = ids.clone()
    served_idx[torch.from_numpy(cold - 1)] = 0  # what the model may know of each item: no ID for held-out ones
    item_vecs = towers.item_vec(table[ids], served_idx)
    out: dict[int, list[int]] = {n: [] for n in sizes}
    for a in range(0, len(users), batch):
        ex = [ds.test_example(u) for u in users[a : a + batch]]
        items, valid = left_pad([e[0] for e in ex], max_len)
        ts, _ = left_pad([e[1] for e in ex], max_len)
        item_t, ts_t, valid_t = torch.from_numpy(items), torch.from_numpy(ts), torch.from_numpy(valid)
        idx_t = torch.where(item_t > 0, served_idx[(item_t - 1).clamp(min=0)], 0)
        qts = torch.tensor([[e[3]] for e in ex])
        uvec = towers.user_seq(table[item_t], idx_t, valid_t, last_only=True)[:, 0]
        recall = uvec @ item_vecs.T  # [U,N]
        hidden, k, v = ranker.history(table[item_t], idx_t, ts_t, valid_t, qts)
        q = ranker.next_item_query(hidden[:, -1]).unsqueeze(1)
        U = len(ex)
        pos = torch.full((U, 1), item_t.shape[1], dtype=torch.int64)
        rank_scores = ranker.candidates(  # content [1,N,E]: projected once, broadcast over users
            k, v, q, ts_t, valid_t, table[ids].unsqueeze(0), served_idx.expand(U, -1), pos, qts
        )
        for i, e in enumerate(ex):
            seen = torch.from_numpy(np.setdiff1d(np.unique(e[0]), [e[2]]) - 1)
            recall[i, seen] = -torch.inf  # paper protocol: the history is not recommended again
            order = order_random_ties(recall[i], gen)
            for n in sizes:
                top = order[: min(n, N)]
                hit = (top == e[2] - 1).nonzero()
                if len(hit) == 0:
                    out[n].append(10**9)
                    continue
                out[n].append(rank_random_ties(rank_scores[i, top], int(hit[0, 0]), gen))
    return {n: np.array(r) for n, r in out.items()}


def run(cfg: BuildConfig, ds: Dataset, emb16: np.ndarray, out_dir: Path, log=print) -> dict:
    """Train both variants on the warm items, evaluate on cold test events, write cold_start.json."""
    c = cfg.coldstart
    cold = pick_cold_items(ds.num_items, c.fraction, cfg.seed)
    warm = np.setdiff1d(np.arange(1, ds.num_items + 1), cold)
    warm_ds = without_items(ds, cold)
    users = cold_test_users(ds, cold)
    sizes = tuple(min(n, ds.num_items) for n in c.cascade_sizes)
    log(f"cold start: {len(cold)} of {ds.num_items} items held out; {len(users)} cold test events")
    results: dict[str, dict] = {}
    training: dict[str, dict] = {}
    for variant in VARIANTS:
        content = emb16 if variant == VARIANTS[0] else np.zeros_like(emb16)
        t = time.time()
        towers, _, ti = T.train_towers(cfg, warm_ds, content, log=log, warm=warm)
        ranker, _, ri = T.train_ranker(cfg, warm_ds, content, log=log, warm=warm)
        table = T.content_table(content)
        ranks = cascade_ranks_cold(ds, users, table, towers, ranker, cold, sizes, cfg.ranker.max_len, cfg.seed)
        for n, r in ranks.items():
            results[f"{variant}: cascade top-{n} -> HSTU"] = rank_metrics(r)
        training[variant] = {
            name: {k: v for k, v in info.items() if k != "epochs"} for name, info in (("towers", ti), ("ranker", ri))
        }
        log(f"cold start, {variant}: {time.time() - t:.0f}s")
    out = {
        "config": cfg.name,
        "held_out_items": int(len(cold)),
        "items": ds.num_items,
        "cold_test_events": len(users),
        "chance_hr@10": 10.0 / max(1, ds.num_items),
        "results": results,
        "training": training,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cold_start.json").write_text(json.dumps(out, indent=2))
    return out
