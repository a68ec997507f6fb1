"""Training loops for the HSTU ranker, the LEARN towers and SASRec, with leave-one-out validation.

All three see only each user's training prefix (everything but the validation and test items); the
best epoch by validation NDCG@10 is kept. Deterministic for a seed (CPU).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.batches import left_pad, sample_windows
from training.config import BuildConfig
from training.data import Dataset
from training.metrics import rank_metrics
from training.models import HSTURanker, SASRec, TwoTower

VALID_USERS = 500  # validation subset size (full test eval runs in training/evaluate.py)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train_device() -> torch.device:
    """FALCONREC_TRAIN_DEVICE, else CUDA when present, else CPU (the ml1m configs fit either)."""
    name = os.environ.get("FALCONREC_TRAIN_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def content_table(emb16: np.ndarray) -> torch.Tensor:
    """[N+1, E] float32 with row 0 = zeros (padding), from the float16 [N, E] embeddings."""
    t = torch.zeros(emb16.shape[0] + 1, emb16.shape[1])
    t[1:] = torch.from_numpy(emb16.astype(np.float32))
    return t


# --------------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON kwargs, never pickle)
# --------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: torch.nn.Module, kwargs: dict, extra: dict | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"kwargs": kwargs, **(extra or {})}, indent=2))


def load_checkpoint(path: Path, cls: type[torch.nn.Module]) -> torch.nn.Module:
    info = json.loads(path.with_suffix(".json").read_text())
    model = cls(**info["kwargs"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# evaluation helpers shared with training/evaluate.py
# --------------------------------------------------------------------------------------------------
def history_tensors(ds: Dataset, users: list[int], split: str, max_len: int, table: torch.Tensor):
    ex = [ds.valid_example(u) if split == "valid" else ds.test_example(u) for u in users]
    items, valid = left_pad([e[0] for e in ex], max_len)
    ts, _ = left_pad([e[1] for e in ex], max_len)
    dev = table.device
    item_t = torch.from_numpy(items).to(dev)
    return (
        table[item_t],
        item_t,
        torch.from_numpy(ts).to(dev),
        torch.from_numpy(valid).to(dev),
        np.array([e[2] for e in ex]),
        torch.from_numpy(np.array([e[3] for e in ex], dtype=np.int64)).to(dev),
    )


@torch.inference_mode()
def ranker_scores_full(model: HSTURanker, hist, table: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Scores of every catalog item [U, N] (column i = item i+1), candidates in microbatches."""
    emb, item, ts, valid, _, qts = hist
    hidden, k, v = model.history(emb, item, ts, valid)
    U, L = item.shape
    q = model.next_item_query(hidden[:, -1]).unsqueeze(1)
    N = table.shape[0] - 1
    dev = table.device
    out = torch.empty(U, N, device=dev)
    for a in range(1, N + 1, chunk):
        ids = torch.arange(a, min(a + chunk, N + 1), device=dev)
        c_item = ids.expand(U, -1)
        pos = torch.full(c_item.shape, L, dtype=torch.int64, device=dev)
        out[:, a - 1 : a - 1 + len(ids)] = model.candidates(
            k, v, q.expand(U, len(ids), -1), ts, valid, table[c_item], c_item, pos, qts.unsqueeze(1).expand_as(c_item)
        )
    return out


@torch.inference_mode()
def dot_scores_full(user_vec: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
    return user_vec @ item_vecs.T


def evaluate_scorer(
    ds: Dataset,
    users: list[int],
    split: str,
    max_len: int,
    table: torch.Tensor,
    score_fn: Callable,
    batch: int = 256,
) -> dict[str, float]:
    ranks = []
    for a in range(0, len(users), batch):
        hist = history_tensors(ds, users[a : a + batch], split, max_len, table)
        scores = score_fn(hist)
        target = torch.from_numpy(hist[4] - 1).to(scores.device)
        tscore = scores.gather(1, target.unsqueeze(1))
        ranks.append((scores > tscore).sum(1).cpu().numpy())
    return rank_metrics(np.concatenate(ranks))


# --------------------------------------------------------------------------------------------------
# shared AR batch
# --------------------------------------------------------------------------------------------------
def _ar_batch(ds: Dataset, users: np.ndarray, max_len: int, rng: np.random.Generator, dev: torch.device):
    """Windows of max_len+1 training items: inputs are the first max_len, targets the shifted ones."""
    seqs = [ds.train_seq(u)[0] for u in users]
    times = [ds.train_seq(u)[1] for u in users]
    ws, ts = sample_windows(seqs, times, max_len + 1, rng)
    w, wv = left_pad(ws, max_len + 1)
    wt, _ = left_pad(ts, max_len + 1)
    return torch.from_numpy(w).to(dev), torch.from_numpy(wt).to(dev), torch.from_numpy(wv).to(dev)


def _sampled_softmax(q: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, mask: torch.Tensor, temp: float):
    """q, pos: [B,L,d] normalised; neg: [K,d]; mask [B,L]. Mean CE of the positive among 1+K."""
    lp = (q * pos).sum(-1, keepdim=True)
    ln = q @ neg.T
    logits = torch.cat([lp, ln], -1) / temp
    loss = F.cross_entropy(
        logits.flatten(0, 1),
        torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.long, device=q.device),
        reduction="none",
    )
    return (loss * mask.flatten()).sum() / mask.sum().clamp(min=1)


def _fit(
    name: str,
    model: torch.nn.Module,
    epochs: int,
    batch_size: int,
    lr: float,
    ds: Dataset,
    step: Callable,
    validate: Callable,
    seed: int,
    log: Callable[[str], None],
    eval_every: int = 1,
) -> tuple[torch.nn.Module, dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    users = np.array([u for u in range(ds.num_users) if len(ds.seqs[u]) >= 3])
    best, best_state, history = -1.0, copy.deepcopy(model.state_dict()), []
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        rng.shuffle(users)
        losses = []
        bar = tqdm(range(0, len(users), batch_size), desc=f"{name} epoch {epoch}/{epochs}", leave=False)
        for a in bar:
            loss = step(users[a : a + batch_size], rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if epoch % eval_every and epoch != epochs:
            log(f"{name} epoch {epoch}: loss {np.mean(losses):.4f}")
            continue
        model.eval()
        m = validate()
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), **m})
        log(f"{name} epoch {epoch}: loss {np.mean(losses):.4f} valid NDCG@10 {m['ndcg@10']:.4f} HR@10 {m['hr@10']:.4f}")
        if m["ndcg@10"] > best:
            best, best_state = m["ndcg@10"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval().cpu()
    return model, {"best_valid_ndcg@10": best, "epochs": history, "train_seconds": time.time() - t0}


def _valid_users(ds: Dataset, seed: int) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    users = np.arange(ds.num_users)
    return sorted(rng.choice(users, size=min(VALID_USERS, len(users)), replace=False).tolist())


# --------------------------------------------------------------------------------------------------
# HSTU ranker
# --------------------------------------------------------------------------------------------------
def ranker_kwargs(cfg: BuildConfig, ds: Dataset, content_dim: int) -> dict:
    r = cfg.ranker
    return dict(
        content_dim=content_dim,
        num_items=ds.num_items,
        max_len=r.max_len,
        d_model=r.d_model,
        num_layers=r.num_layers,
        num_heads=r.num_heads,
        dqk=r.dqk,
        dv=r.dv,
        dropout=r.dropout,
        num_time_buckets=r.num_time_buckets,
        temperature=r.temperature,
    )


def train_ranker(cfg: BuildConfig, ds: Dataset, emb16: np.ndarray, log=print) -> tuple[HSTURanker, dict, dict]:
    seed_all(cfg.seed)
    r = cfg.ranker
    table = content_table(emb16)
    kwargs = ranker_kwargs(cfg, ds, emb16.shape[1])
    dev = train_device()
    table = table.to(dev)
    model = HSTURanker(**kwargs).to(dev)
    model.items.set_content_stats(table)
    L, S, K, N = r.max_len, r.target_positions, r.cand_negatives, ds.num_items

    def step(users: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        w, wt, wv = _ar_batch(ds, users, L, rng, dev)
        item, ts, valid = w[:, :L], wt[:, :L], wv[:, :L]
        hidden, k, v = model.history(table[item], item, ts, valid)
        aux_negs = torch.from_numpy(rng.integers(1, N + 1, size=r.negatives)).to(dev)
        neg_out = model.item_out(table[aux_negs], aux_negs)
        negs = aux_negs[:K]
        # Auxiliary next-item loss on every history position (plain HSTU training signal).
        tgt = w[:, 1:]
        tmask = wv[:, 1:] * valid
        queries = model.next_item_query(hidden)  # [B,L,d]: position i predicts item i+1
        aux = _sampled_softmax(queries, model.item_out(table[tgt], tgt), neg_out, tmask, r.temperature)
        # Target-aware loss: at S target positions p, rank the true item w[p] among K negatives, with
        # the candidate seeing history j < p only: exactly what serving computes at p = L.
        B = w.shape[0]
        p_valid = (wv[:, 1:] * wv[:, :-1]).cpu().numpy()  # target p=1..L needs item p and item p-1 valid
        pos = np.zeros((B, S), dtype=np.int64)
        pmask = np.zeros((B, S), dtype=np.float32)
        for b in range(B):
            choices = np.flatnonzero(p_valid[b]) + 1
            if len(choices):
                pick = rng.choice(choices, size=S, replace=len(choices) < S)
                pick[0] = L  # always train the serving position (newest target)
                pos[b], pmask[b] = pick, 1.0
        pos_t = torch.from_numpy(pos).to(dev)
        true_item = w.gather(1, pos_t)  # [B,S]
        cand_item = torch.cat([true_item.unsqueeze(-1), negs.expand(B, S, K)], -1).reshape(B, -1)
        cand_pos = pos_t.unsqueeze(-1).expand(B, S, K + 1).reshape(B, -1)
        cand_ts = wt.gather(1, pos_t).unsqueeze(-1).expand(B, S, K + 1).reshape(B, -1)
        d = queries.shape[-1]
        q_at = queries.gather(1, (pos_t - 1).unsqueeze(-1).expand(B, S, d))  # query of prefix j < p
        cand_q = q_at.unsqueeze(2).expand(B, S, K + 1, d).reshape(B, -1, d)
        scores = model.candidates(k, v, cand_q, ts, valid, table[cand_item], cand_item, cand_pos, cand_ts)
        ce = F.cross_entropy(
            scores.reshape(B * S, K + 1), torch.zeros(B * S, dtype=torch.long, device=dev), reduction="none"
        )
        pm = torch.from_numpy(pmask).flatten().to(dev)
        main = (ce * pm).sum() / pm.sum().clamp(min=1)
        return main + r.aux_weight * aux

    vusers = _valid_users(ds, cfg.seed)

    def validate() -> dict:
        return evaluate_scorer(ds, vusers, "valid", L, table, lambda h: ranker_scores_full(model, h, table))

    model, info = _fit(
        "ranker", model, r.epochs, r.batch_size, r.lr, ds, step, validate, cfg.seed, log, cfg.ranker.eval_every
    )
    return model, kwargs, info


# --------------------------------------------------------------------------------------------------
# SASRec baseline
# --------------------------------------------------------------------------------------------------
def sasrec_kwargs(cfg: BuildConfig, ds: Dataset, content_dim: int) -> dict:
    r = cfg.ranker
    return dict(
        content_dim=content_dim,
        num_items=ds.num_items,
        max_len=r.max_len,
        d=r.d_model,
        layers=r.num_layers,
        heads=r.num_heads,
        dropout=r.dropout,
        temperature=r.temperature,
    )


def train_sasrec(cfg: BuildConfig, ds: Dataset, emb16: np.ndarray, log=print) -> tuple[SASRec, dict, dict]:
    seed_all(cfg.seed)
    r = cfg.ranker
    table = content_table(emb16)
    kwargs = sasrec_kwargs(cfg, ds, emb16.shape[1])
    dev = train_device()
    table = table.to(dev)
    model = SASRec(**kwargs).to(dev)
    model.items.set_content_stats(table)
    L, K, N = r.max_len, r.negatives, ds.num_items

    def step(users, rng):
        w, _, wv = _ar_batch(ds, users, L, rng, dev)
        item, valid = w[:, :L], wv[:, :L]
        q = model(table[item], item, valid)
        negs = torch.from_numpy(rng.integers(1, N + 1, size=K)).to(dev)
        tgt = w[:, 1:]
        return _sampled_softmax(
            q, model.item_out(table[tgt], tgt), model.item_out(table[negs], negs), wv[:, 1:] * valid, r.temperature
        )

    vusers = _valid_users(ds, cfg.seed)

    def validate():
        return evaluate_scorer(ds, vusers, "valid", L, table, lambda h: sasrec_scores_full(model, h, table))

    model, info = _fit(
        "sasrec", model, cfg.sasrec.epochs, r.batch_size, r.lr, ds, step, validate, cfg.seed, log, cfg.ranker.eval_every
    )
    return model, kwargs, info


@torch.inference_mode()
def sasrec_scores_full(model: SASRec, hist, table: torch.Tensor) -> torch.Tensor:
    emb, item, _, valid, _, _ = hist
    q = model(emb, item, valid)[:, -1]
    ids = torch.arange(1, table.shape[0], device=table.device)
    return q @ model.item_out(table[ids], ids).T


# --------------------------------------------------------------------------------------------------
# LEARN towers
# --------------------------------------------------------------------------------------------------
def towers_kwargs(cfg: BuildConfig, ds: Dataset, content_dim: int) -> dict:
    t = cfg.towers
    return dict(
        content_dim=content_dim,
        num_items=ds.num_items,
        max_len=cfg.ranker.max_len,
        d=t.d_model,
        layers=t.num_layers,
        heads=t.num_heads,
        temperature=t.temperature,
    )


@torch.inference_mode()
def all_item_vecs(model: TwoTower, table: torch.Tensor) -> torch.Tensor:
    ids = torch.arange(1, table.shape[0], device=table.device)
    return model.item_vec(table[ids], ids)


def train_towers(cfg: BuildConfig, ds: Dataset, emb16: np.ndarray, log=print) -> tuple[TwoTower, dict, dict]:
    seed_all(cfg.seed)
    t = cfg.towers
    table = content_table(emb16)
    kwargs = towers_kwargs(cfg, ds, emb16.shape[1])
    dev = train_device()
    table = table.to(dev)
    model = TwoTower(**kwargs).to(dev)
    model.item_in.set_content_stats(table)
    model.user_in.set_content_stats(table)
    L, N = cfg.ranker.max_len, ds.num_items
    K = min(1024, N)

    def step(users, rng):
        w, _, wv = _ar_batch(ds, users, L, rng, dev)
        item, valid = w[:, :L], wv[:, :L]
        q = model.user_seq(table[item], item, valid)
        negs = torch.from_numpy(rng.integers(1, N + 1, size=K)).to(dev)
        tgt = w[:, 1:]
        return _sampled_softmax(
            q, model.item_vec(table[tgt], tgt), model.item_vec(table[negs], negs), wv[:, 1:] * valid, t.temperature
        )

    vusers = _valid_users(ds, cfg.seed)

    def validate():
        iv = all_item_vecs(model, table)
        return evaluate_scorer(ds, vusers, "valid", L, table, lambda h: towers_user_vec(model, h) @ iv.T)

    model, info = _fit(
        "towers", model, t.epochs, t.batch_size, t.lr, ds, step, validate, cfg.seed, log, cfg.ranker.eval_every
    )
    return model, kwargs, info


@torch.inference_mode()
def towers_user_vec(model: TwoTower, hist) -> torch.Tensor:
    emb, item, _, valid, _, _ = hist
    return model.user_seq(emb, item, valid)[:, -1]
