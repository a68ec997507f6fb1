"""`falconrec models retrain`: a new version trained on what the service has seen (issue 25, point 5).

The snapshot is the store (Redis: the service's shared store; an in-process store lives and dies with its server
process and cannot be read from here): every user's stored history, which holds the build's history tail plus the
events written since, and the items added live, from the item log, with the content embeddings the ingestion worker
computed. The new dataset is the current version's, with each user's newer events appended (those after the user's
last build-time event; a history the store kept only in part is never shortened) and the live items appended to
the catalog (indices after the trained ones, so the served indices stay valid and a swap can share the store). The
towers and the ranker warm-start from the current version's weights: live items get ID embeddings of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.ingest.feed import decode_result, log_key
from service.stores.base import VERSION_KEY, hist_key, unpack_history
from training.dataset import Dataset


@dataclass
class Snapshot:
    dataset: Dataset
    emb: np.ndarray  # float16 [N', E]: the current version's rows, then the live items'
    new_items: int
    new_events: int
    new_users: int
    updated: list[int]  # users (dataset indices) whose newest event came from the store: the retrain's holdout


def _live_items(r, version: str, dim: int, known: set[int]) -> list:  # noqa: ANN001 - a redis.Redis
    out, seen = [], set(known)
    for _, fields in r.xrange(log_key(version)):
        item = decode_result(fields, dim)
        if item is not None and item.item_id not in seen:
            seen.add(item.item_id)
            out.append(item)
    return out


def _histories(r, version: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    out = {}
    prefix = hist_key(version, 0)[:-1]
    for key in r.scan_iter(match=prefix + "*", count=1000):
        raw = r.get(key)
        if raw:
            out[int(key.decode().rsplit(":", 1)[1])] = unpack_history(raw)
    return out


def snapshot(redis_url: str, base: Dataset, base_emb: np.ndarray) -> Snapshot:
    import redis

    r = redis.Redis.from_url(redis_url)
    raw_version = r.get(VERSION_KEY)
    if raw_version is None:
        raise RuntimeError(f"no falconrec data in Redis ({VERSION_KEY} unset): nothing to retrain on")
    version = raw_version.decode()
    live = _live_items(r, version, base_emb.shape[1], set(base.item_raw_ids.tolist()))
    raw_ids = np.concatenate([base.item_raw_ids, np.array([it.item_id for it in live], np.int64)])
    index_of = {int(x): i + 1 for i, x in enumerate(raw_ids.tolist())}
    emb = np.concatenate([base_emb, np.stack([it.emb for it in live])]) if live else base_emb
    seqs, times = list(base.seqs), list(base.times)
    users = {int(u): i for i, u in enumerate(base.user_raw_ids.tolist())}
    user_ids = list(base.user_raw_ids.tolist())
    added, updated = 0, []
    for u, (items, ts) in sorted(_histories(r, version).items()):
        i = users.get(u)
        last = int(base.times[i][-1]) if i is not None and len(base.times[i]) else -1
        newer = ts > last  # events after the build's last one for this user (the store keeps a tail only)
        idx = np.array([index_of.get(int(x), 0) for x in items[newer]], np.int64)
        keep = idx > 0  # an event on an item this snapshot does not know (none expected) is left out
        if not keep.any():
            continue
        added += int(keep.sum())
        updated.append(i if i is not None else len(seqs))
        if i is None:
            users[u] = len(seqs)
            user_ids.append(u)
            seqs.append(idx[keep])
            times.append(ts[newer][keep].astype(np.int64))
        else:
            seqs[i] = np.concatenate([seqs[i], idx[keep]])
            times[i] = np.concatenate([times[i], ts[newer][keep].astype(np.int64)])
    keys = None
    if base.item_keys is not None:
        keys = np.array([*base.item_keys.tolist(), *[it.key or str(it.item_id) for it in live]])
    ds = Dataset(
        name=base.name,
        item_raw_ids=raw_ids,
        item_texts=[*base.item_texts, *[it.title for it in live]],  # live items' texts are not kept: titles
        user_raw_ids=np.array(user_ids, np.int64),
        seqs=seqs,
        times=times,
        meta=dict(base.meta),
        item_keys=keys,
        user_keys=None,  # new users' string ids are not in the store (only their hashes); meta keeps the kind
        item_titles=[*base.item_titles, *[it.title for it in live]] if base.item_titles is not None else None,
    )
    return Snapshot(ds, emb.astype(np.float16), len(live), added, len(user_ids) - base.num_users, sorted(updated))


HOLDOUT_USERS = 2000  # a seeded sample beyond this: the gate's holdout costs seconds, not the retrain's minutes


def holdout_metrics(ds: Dataset, users: list[int], emb16: np.ndarray, ckpts: dict[str, Path], top_n: int, seed: int):
    """HR@10 / NDCG@10 of each ranker checkpoint on the same holdout: each updated user's newest event (the test
    position, which training never sees), ranked among the snapshot's whole catalog with the user's history items
    left out, scored as validation is (`top_n` > 0: the full ranker on the next-item score's top `top_n`). A checkpoint
    trained on a smaller catalog (the current version) meets the items it does not know with a zero ID embedding,
    as serving does: content only. Returns {name: metrics}."""
    import torch

    from training.metrics import rank_metrics
    from training.models import HSTURanker
    from training.train import (
        content_table,
        load_checkpoint,
        ranker_scores_full,
        ranker_scores_reranked,
        scorer_ranks,
        warm_start,
    )

    users = [u for u in users if len(ds.seqs[u]) >= 2]
    if len(users) > HOLDOUT_USERS:
        users = sorted(np.random.default_rng(seed).choice(users, HOLDOUT_USERS, replace=False).tolist())
    table = content_table(emb16)
    out = {}
    for name, path in ckpts.items():
        model = load_checkpoint(path, HSTURanker)
        if model.items.ids.num_embeddings < table.shape[0]:  # the catalog grew since: unknown ids are zeros
            kwargs = {**json.loads(path.with_suffix(".json").read_text())["kwargs"], "num_items": ds.num_items}
            grown = HSTURanker(**kwargs)
            with torch.no_grad():
                warm_start(grown, model.state_dict())
                grown.items.ids.weight[model.items.ids.num_embeddings :].zero_()
            model = grown.eval()
        if top_n > 0:
            score = lambda h, m=model: ranker_scores_reranked(m, h, table, top_n)  # noqa: E731
        else:
            score = lambda h, m=model: ranker_scores_full(m, h, table)  # noqa: E731
        ranks = scorer_ranks(ds, users, "test", model.max_len, table, score)[True]
        out[name] = {k: v for k, v in rank_metrics(ranks).items() if k in ("hr@10", "ndcg@10", "users")}
    return out
