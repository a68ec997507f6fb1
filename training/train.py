"""Training loops for the HSTU ranker, the LEARN towers and SASRec, with leave-one-out validation.

All three see only each user's training prefix (everything but the validation and test items). Each trains
until validation NDCG@10 (second-last item of 1,000 users, the paper's protocol) stops improving or its
wall-clock safety cap runs out (reported as capped); the best epoch is kept. Deterministic for a seed (CPU).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from training.batches import PackedSequences, left_pad
from training.config import BuildConfig
from training.data import Dataset
from training.metrics import rank_metrics
from training.models import HSTURanker, ItemEmbedding, SASRec, TwoTower
from training.schedule import DecaySchedule

# Validation users for early stopping (the second-last item of each; the test item is never looked at).
VALID_USERS = 1000


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also NaN-fills every new uninitialised tensor (a debugging aid, not part of the
    # determinism): ~500 fills per ranker step, ~7 % of a step on 2 cores.
    torch.utils.deterministic.fill_uninitialized_memory = False


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


def warm_start(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy a previous version's weights into `model`; a table that has more rows now (the catalog grew: items added
    live get ID embeddings) keeps its old rows and its new rows' fresh init. Returns the tensors that grew."""
    own = model.state_dict()
    grown = []
    for k, v in state.items():
        if k not in own:
            continue
        t = own[k]
        if t.shape == v.shape:
            t.copy_(v)
        elif t.dim() == v.dim() and t.shape[1:] == v.shape[1:] and t.shape[0] > v.shape[0]:
            t[: v.shape[0]].copy_(v)
            grown.append(k)
        else:
            raise ValueError(f"cannot warm-start {k}: {tuple(v.shape)} -> {tuple(t.shape)} (other model sizes?)")
    model.load_state_dict(own)
    return grown


def load_checkpoint(path: Path, cls: type[torch.nn.Module]) -> torch.nn.Module:
    info = json.loads(path.with_suffix(".json").read_text())
    model = cls(**info["kwargs"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# --------------------------------------------------------------------------------------------------
# evaluation helpers shared with training/evaluate.py
# --------------------------------------------------------------------------------------------------
def example(ds: Dataset, u: int, split: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    return ds.valid_example(u) if split == "valid" else ds.test_example(u)


def history_tensors(ds: Dataset, users: list[int], split: str, max_len: int, table: torch.Tensor):
    ex = [example(ds, u, split) for u in users]
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


def seen_mask_index(ds: Dataset, users: list[int], split: str, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of every item in each user's WHOLE history (not only the last max_len), the target
    itself left out: the paper's protocol ranks only items the user has not interacted with."""
    rows, cols = [], []
    for r, u in enumerate(users):
        h = np.unique(example(ds, u, split)[0])
        h = h[h != targets[r]]
        rows.append(np.full(len(h), r, np.int64))
        cols.append(h - 1)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)


@torch.inference_mode()
def ranker_scores_full(model: HSTURanker, hist, table: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Scores of every catalog item [U, N] (column i = item i+1), candidates in microbatches."""
    emb, item, ts, valid, _, qts = hist
    hidden, k, v = model.history(emb, item, ts, valid, qts.unsqueeze(1))
    U, L = item.shape
    q = model.next_item_query(hidden[:, -1]).unsqueeze(1)
    N = table.shape[0] - 1
    dev = table.device
    out = torch.empty(U, N, device=dev)
    pos = torch.full((U, 1), L, dtype=torch.int64, device=dev)
    for a in range(1, N + 1, chunk):
        ids = torch.arange(a, min(a + chunk, N + 1), device=dev)
        c_item = ids.expand(U, -1)
        out[:, a - 1 : a - 1 + len(ids)] = model.candidates(
            k, v, q, ts, valid, table[ids].expand(U, -1, -1), c_item, pos, qts.unsqueeze(1)
        )
    return out


@torch.inference_mode()
def ranker_scores_reranked(model: HSTURanker, hist, table: torch.Tensor, top_n: int) -> torch.Tensor:
    """Validation's cheaper stand-in for ranker_scores_full [U, N]: the full score for the top `top_n` items
    of the next-item score (the history items in the window left out, as the paper protocol does), -inf for
    the rest. 200 of 3,706 items cost ~1/18 of the full pass (~30 s per validation on 2 cores for ml1m),
    and a target the first stage misses cannot reach the top 10 anyway."""
    emb, item, ts, valid, _, qts = hist
    hidden, k, v = model.history(emb, item, ts, valid, qts.unsqueeze(1))
    U, L = item.shape
    q = model.next_item_query(hidden[:, -1])
    ids = torch.arange(1, table.shape[0], device=table.device)
    base = q @ model.item_out(table[ids], ids).T  # [U,N], column i = item i+1
    seen = (item > 0) & (valid > 0)
    base[torch.arange(U, device=base.device).unsqueeze(1).expand(U, L)[seen], item[seen] - 1] = -torch.inf
    top = base.topk(min(top_n, base.shape[1]), dim=1).indices  # [U,n] columns
    c_item = top + 1
    pos = torch.full((U, 1), L, dtype=torch.int64, device=table.device)
    scores = model.candidates(k, v, q.unsqueeze(1), ts, valid, table[c_item], c_item, pos, qts.unsqueeze(1))
    return torch.full_like(base, -torch.inf).scatter_(1, top, scores)


@torch.inference_mode()
def dot_scores_full(user_vec: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
    return user_vec @ item_vecs.T


@torch.inference_mode()
def scorer_ranks(
    ds: Dataset,
    users: list[int],
    split: str,
    max_len: int,
    table: torch.Tensor,
    score_fn: Callable,
    batch: int = 256,
) -> dict[bool, np.ndarray]:
    """0-based rank of each user's target over the full catalog, keyed by whether the user's history items
    are excluded from the ranking (True: the paper's protocol) or compete with the target (False).
    One scoring pass serves both."""
    ranks: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for a in range(0, len(users), batch):
        part = users[a : a + batch]
        hist = history_tensors(ds, part, split, max_len, table)
        scores = score_fn(hist)
        target = torch.from_numpy(hist[4] - 1).to(scores.device)
        tscore = scores.gather(1, target.unsqueeze(1))
        above = scores > tscore  # [U,N]
        ranks[False].append(above.sum(1).cpu().numpy())
        r, c = seen_mask_index(ds, part, split, hist[4])
        above[torch.from_numpy(r).to(above.device), torch.from_numpy(c).to(above.device)] = False
        ranks[True].append(above.sum(1).cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in ranks.items()}


def evaluate_scorer(
    ds: Dataset,
    users: list[int],
    split: str,
    max_len: int,
    table: torch.Tensor,
    score_fn: Callable,
    batch: int = 256,
    exclude_history: bool = True,
) -> dict[str, float]:
    """Leave-one-out metrics over the full catalog. `exclude_history` (the paper's protocol): items the user
    has already interacted with are not ranked; without it they compete with the target."""
    return rank_metrics(scorer_ranks(ds, users, split, max_len, table, score_fn, batch)[exclude_history])


# --------------------------------------------------------------------------------------------------
# batches and the loss
# --------------------------------------------------------------------------------------------------
class Batcher:
    """Training windows of max_len+1 items (inputs are the first max_len, targets the shifted ones), built
    by array ops over every user's training prefix packed once."""

    def __init__(self, ds: Dataset, max_len: int, dev: torch.device, held_out: set[int] | None = None):
        """`held_out`: the users whose validation item training must not see (None: every user's)."""
        seqs = [ds.train_seq(u, keep_valid=held_out is not None and u not in held_out) for u in range(ds.num_users)]
        self.packed = PackedSequences([s for s, _ in seqs], [t for _, t in seqs])
        self.max_len, self.dev = max_len, dev

    def __call__(self, users: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        w, wt, wv = self.packed.windows(users, self.max_len + 1, rng)
        # Drop the columns that are padding in every row (batches group users of similar length, see
        # length_batches): exact, since positions and time biases never depend on the padding's width.
        first = int(min(np.argmax(wv.any(0)), w.shape[1] - 2))
        w, wt, wv = w[:, first:], wt[:, first:], wv[:, first:]
        return torch.from_numpy(w).to(self.dev), torch.from_numpy(wt).to(self.dev), torch.from_numpy(wv).to(self.dev)

    def lengths(self, users: np.ndarray) -> np.ndarray:
        return np.minimum(self.packed.lengths[users], self.max_len + 1)


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of positions into `lengths`, grouping similar lengths (jittered by up to 25% so batches differ
    between epochs), in random order. ML-1M windows average ~108 of 201 items: one padded width for every
    batch spent about half of each step on padding."""
    key = lengths * (1.0 + 0.25 * rng.random(len(lengths)))
    order = np.argsort(key, kind="stable")
    batches = [order[a : a + batch_size] for a in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


MASKED_LOGIT = -1e4  # a sampled negative that is the positive (the reference uses a large negative logit too)


def sampled_softmax(
    q: torch.Tensor,
    tgt: torch.Tensor,
    mask: torch.Tensor,
    item_vecs: Callable[[torch.Tensor], torch.Tensor],
    catalog: int | torch.Tensor,
    num_negatives: int,
    temperature: float,
    gen: torch.Generator,
    pool_size: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of each position's positive among itself and `num_negatives` negatives drawn for
    THAT position; a negative equal to the positive is masked out.

    q: [B,L,d] L2-normalised queries; tgt: [B,L] target ids (1..N); mask: [B,L] positions that count;
    item_vecs: ids -> L2-normalised item vectors; catalog: the items negatives come from (N: ids 1..N, or
    an explicit id list). Negatives are drawn uniformly, per position, from a pool of `pool_size` uniformly
    drawn items (the whole catalog when it is smaller): one matmul against the pool then a gather, instead
    of materialising [positions, K, d] negative vectors (~8x the work here). With `num_negatives` >= `pool_size`,
    the pool is shared: every position of the batch is scored against all of it (uniform draws, so the logQ
    correction is a constant and drops out of the softmax).
    """
    sel = mask.flatten() > 0
    qv = q.flatten(0, 1)[sel]  # [P,d]
    t = tgt.flatten()[sel]  # [P]
    if num_negatives <= 0:
        return full_softmax(qv, t, item_vecs, catalog, temperature)
    pool, pick = sample_negatives(len(t), catalog, num_negatives, gen, pool_size, q.device)
    pool_vec = item_vecs(pool)
    in_order = isinstance(catalog, int) and len(pool) == catalog  # the whole catalog: row i = item i+1
    pos_vec = pool_vec[t - 1] if in_order else item_vecs(t)
    if pick is None:  # shared: every position's negatives are the whole pool, one matmul and no gather
        neg = (qv @ pool_vec.T).masked_fill(pool.unsqueeze(0) == t.unsqueeze(1), MASKED_LOGIT * temperature)
    else:
        neg = (qv @ pool_vec.T).gather(1, pick)  # [P,K]
        neg = neg.masked_fill(pool[pick] == t.unsqueeze(1), MASKED_LOGIT * temperature)
    logits = torch.cat([(qv * pos_vec).sum(-1, keepdim=True), neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(t), dtype=torch.long, device=q.device))


def full_softmax(
    qv: torch.Tensor, t: torch.Tensor, item_vecs: Callable[[torch.Tensor], torch.Tensor], catalog, temperature: float
) -> torch.Tensor:
    """Cross-entropy of each position's positive against EVERY catalog item (negatives = 0 in a config).

    Every item is a negative at every step, so it learns more per epoch than 128 sampled negatives, but on
    ML-1M an epoch costs ~3x (the [P, 3,706] softmax is memory-bound; the ablation is in the README)."""
    if isinstance(catalog, int):
        ids = torch.arange(1, catalog + 1, device=qv.device)
        col = t - 1
    else:
        ids = catalog.to(qv.device)
        where = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long, device=qv.device)
        where[ids] = torch.arange(len(ids), device=qv.device)
        col = where[t]
        if bool((col < 0).any()):
            raise ValueError("a target item is not in the training catalog")
    logits = qv @ item_vecs(ids).T / temperature
    return F.cross_entropy(logits, col)


def draw_items(catalog: int | torch.Tensor, shape: tuple[int, ...], gen: torch.Generator, dev) -> torch.Tensor:
    """Uniform item ids from `catalog` (N: ids 1..N; or an explicit id list)."""
    if isinstance(catalog, int):
        return torch.randint(1, catalog + 1, shape, generator=gen, device=dev)
    return catalog[torch.randint(0, len(catalog), shape, generator=gen, device=dev)]


def sample_negatives(
    positions: int, catalog: int | torch.Tensor, k: int, gen: torch.Generator, pool_size: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pool [Q] item ids, pick [positions, k] indices into the pool): position p's negatives are
    pool[pick[p]], drawn uniformly and independently for every position. The pool is the whole catalog
    (ids 1..N in order, or the given id list) when it has at most `pool_size` items, else `pool_size`
    uniform draws from it. pick is None when k >= pool_size: the pool is every position's negatives (shared)."""
    size = catalog if isinstance(catalog, int) else len(catalog)
    if size <= pool_size:
        pool = torch.arange(1, size + 1, device=dev) if isinstance(catalog, int) else catalog.to(dev)
    else:
        pool = draw_items(catalog, (pool_size,), gen, dev)
    if k >= pool_size:  # as configured, so a small catalog keeps per-position draws
        return pool, None
    return pool, torch.randint(0, len(pool), (positions, k), generator=gen, device=dev)


@dataclass(frozen=True)
class FitPlan:
    """How long to train, in epochs: up to max_epochs, stopping after `patience` validations without a new best.
    With `lr_decay` > 0 the plateau (or the last `lr_decay` of max_epochs) starts a linear decay of the rate to
    zero instead, and training ends when it is done. `budget_s` (0 = none) is only a safety cap on wall clock:
    a run it ends is reported as capped, because its model then depends on the machine's speed."""

    max_epochs: int
    patience: int
    budget_s: float
    batch_size: int
    lr: float
    eval_every: int = 1
    lr_decay: float = 0.0  # see training/schedule.py: share of max_epochs spent decaying the rate to zero
    precision: str = "fp32"  # "bf16": the training step under CPU autocast (AMX where the CPU has it)


def _device_type(model: torch.nn.Module) -> str:
    return next(model.parameters()).device.type


def _train_epoch(
    desc: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: DecaySchedule,
    step: Callable,
    users: np.ndarray,
    lengths: np.ndarray,
    plan: FitPlan,
    rng: np.random.Generator,
    epoch: int,
) -> tuple[float, float]:
    """One pass over the users in length-bucketed batches, the rate set per step; (mean loss, last rate)."""
    model.train()
    losses = []
    epoch_batches = length_batches(lengths, plan.batch_size, rng)
    bar = tqdm(epoch_batches, desc=desc, leave=False)
    lr = sched.rate(epoch - 1)
    for i, batch in enumerate(bar):
        lr = sched.rate(epoch - 1 + i / len(epoch_batches))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(_device_type(model), dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
            loss = step(users[batch], rng)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return float(np.mean(losses)), lr


def _fit(
    name: str,
    model: torch.nn.Module,
    plan: FitPlan,
    ds: Dataset,
    step: Callable,
    validate: Callable,
    seed: int,
    log: Callable[[str], None],
    table: torch.Tensor,
) -> tuple[torch.nn.Module, dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.98), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    users = np.array([u for u in range(ds.num_users) if len(ds.seqs[u]) >= 3])
    lengths = np.array([len(ds.seqs[u]) for u in users])
    best, best_epoch, best_state, history = -1.0, 0, copy.deepcopy(model.state_dict()), []
    t0 = time.time()
    train_s: list[float] = []
    stop = "max_epochs"
    sched = DecaySchedule(plan.lr, plan.lr_decay, plan.max_epochs)
    decay_epoch = 0
    # One catalog for the whole fit (steps and validation): its standardised content is computed once.
    with training_catalog(model, table):
        for epoch in range(1, plan.max_epochs + 1):
            te = time.time()
            loss, lr = _train_epoch(f"{name} epoch {epoch}", model, opt, sched, step, users, lengths, plan, rng, epoch)
            train_s.append(time.time() - te)
            row = {"epoch": epoch, "loss": loss, "train_s": train_s[-1], "lr": lr}
            if epoch % plan.eval_every == 0 or epoch == plan.max_epochs:
                tv = time.time()
                model.eval()
                m = validate()
                row.update({**m, "valid_s": time.time() - tv})
                if m["ndcg@10"] > best:
                    best, best_epoch, best_state = m["ndcg@10"], epoch, copy.deepcopy(model.state_dict())
                log(
                    f"{name} epoch {epoch}: loss {row['loss']:.4f} valid NDCG@10 {m['ndcg@10']:.4f}"
                    f" HR@10 {m['hr@10']:.4f} ({train_s[-1]:.1f}s train, {row['valid_s']:.1f}s valid)"
                )
            history.append(row)
            elapsed = time.time() - t0
            cost = elapsed / epoch  # of the next epoch, validation included
            if sched.finished(epoch):
                stop = f"learning rate decayed to zero (from epoch {decay_epoch})"
                break
            plateau = epoch - best_epoch >= plan.patience * plan.eval_every
            was_decaying = sched.decaying
            if not sched.maybe_start(epoch, plateau):
                stop = f"no better validation for {plan.patience} checks"
                break
            if sched.decaying and not was_decaying:
                decay_epoch = epoch + 1
                why = "validation plateau" if plateau else f"last {plan.lr_decay:.0%} of {plan.max_epochs} epochs"
                log(f"{name}: linear learning-rate decay to zero from epoch {decay_epoch} ({why})")
            if plan.budget_s and elapsed + cost > plan.budget_s and epoch < plan.max_epochs:
                stop = f"SAFETY CAP: {plan.budget_s:.0f} s of wall clock, before the schedule's end"
                log(
                    f"{name}: stopped by the {plan.budget_s:.0f} s safety cap after epoch {epoch}: this model depends "
                    "on the machine's speed (raise train_budget_s, or lower epochs)"
                )
                break
    model.load_state_dict(best_state)
    model.eval().cpu()
    log(f"{name}: best epoch {best_epoch} of {len(history)} (stopped: {stop})")
    return model, {
        "best_valid_ndcg@10": best,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped": stop,
        "capped": stop.startswith("SAFETY CAP"),
        "decay_from_epoch": decay_epoch,
        "sec_per_epoch": float(np.mean(train_s)) if train_s else 0.0,
        "epochs": history,
        "train_seconds": time.time() - t0,
    }


@contextmanager
def training_catalog(model: torch.nn.Module, table: torch.Tensor) -> Iterator[None]:
    """Every ItemEmbedding of `model` looks items up by id in `table` (see ItemEmbedding.training_catalog):
    content arguments may be None, and each distinct item is embedded once per call."""
    with ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, ItemEmbedding):
                stack.enter_context(m.training_catalog(table))
        yield


def _batcher(cfg: BuildConfig, ds: Dataset, dev: torch.device) -> Batcher:
    held_out = set(_valid_users(ds, cfg.seed)) if cfg.data.valid_holdout == "valid_users" else None
    return Batcher(ds, cfg.ranker.max_len, dev, held_out)


def _valid_users(ds: Dataset, seed: int) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    users = np.array([u for u in range(ds.num_users) if len(ds.seqs[u]) >= 3])
    return sorted(rng.choice(users, size=min(VALID_USERS, len(users)), replace=False).tolist())


def _negative_catalog(num_items: int, warm: np.ndarray | None, dev: torch.device) -> int | torch.Tensor:
    """Where negatives come from: every item, or only `warm` ones (a cold-start run holds the rest out of
    training entirely, as negatives too)."""
    return num_items if warm is None else torch.from_numpy(np.asarray(warm, np.int64)).to(dev)


def _generator(seed: int, dev: torch.device) -> torch.Generator:
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------------------------------
# HSTU ranker
# --------------------------------------------------------------------------------------------------
def ranker_kwargs(cfg: BuildConfig, ds: Dataset, content_dim: int) -> dict:
    d = cfg.model_dims(content_dim, ds.num_items)
    sizes = ("content_dim", "num_items", "max_len", "d_model", "num_layers", "num_heads", "dqk", "dv")
    return {k: getattr(d, k) for k in (*sizes, "num_time_buckets")} | {
        "dropout": cfg.ranker.dropout,
        "temperature": cfg.ranker.temperature,
    }


def target_position_scores(
    model: HSTURanker,
    k: torch.Tensor,  # [B,NL,L,.] history K/V
    v: torch.Tensor,
    q_at: torch.Tensor,  # [B,S,d] next-item query of the prefix before each target position
    ts: torch.Tensor,  # [B,L]
    valid: torch.Tensor,  # [B,L]
    cand_item: torch.Tensor,  # [B,S,C] candidates of each target position
    pos_t: torch.Tensor,  # [B,S] target positions
    ts_t: torch.Tensor,  # [B,S] their times
) -> torch.Tensor:
    """Scores [B,S,C] of each target position's candidates, each seeing history j < its position.

    One row per (sequence, target position): the row's C candidates share position and time, so the relative
    bias and mask are [B*S,1,L] (broadcast, as serving does) instead of [B,S*C,L] for every candidate."""
    B, S, C = cand_item.shape

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(B, S, *t.shape[1:]).reshape(B * S, *t.shape[1:])

    scores = model.candidates(
        rows(k),
        rows(v),
        q_at.reshape(B * S, 1, -1),
        rows(ts),
        rows(valid),
        None,
        cand_item.reshape(B * S, C),
        pos_t.reshape(B * S, 1),
        ts_t.reshape(B * S, 1),
    )
    return scores.reshape(B, S, C)


def train_ranker(
    cfg: BuildConfig,
    ds: Dataset,
    emb16: np.ndarray,
    log=print,
    warm: np.ndarray | None = None,
    init: Path | None = None,
) -> tuple[HSTURanker, dict, dict]:
    """`init`: a checkpoint to start from (a retrain); its item-ID rows carry over, new items' rows start fresh."""
    seed_all(cfg.seed)
    r = cfg.ranker
    table = content_table(emb16)
    kwargs = ranker_kwargs(cfg, ds, emb16.shape[1])
    dev = train_device()
    table = table.to(dev)
    model = HSTURanker(**kwargs).to(dev)
    if init is not None:
        log(f"ranker: warm start from {init} (grown: {', '.join(warm_start(model, load_file(str(init)))) or '-'})")
    model.items.set_content_stats(table)
    L, S, K, N = r.max_len, r.target_positions, r.cand_negatives, ds.num_items
    batches, gen = _batcher(cfg, ds, dev), _generator(cfg.seed, dev)
    catalog = _negative_catalog(N, warm, dev)

    def step(users: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        w, wt, wv = batches(users, rng)
        item, ts, valid = w[:, :-1], wt[:, :-1], wv[:, :-1]
        hidden, k, v = model.history(None, item, ts, valid, wt[:, -1:])
        # Next-item loss on every history position (plain HSTU training signal).
        queries = model.next_item_query(hidden)  # [B,L,d]: position i predicts item i+1
        aux = sampled_softmax(
            queries,
            w[:, 1:],
            wv[:, 1:] * valid,
            lambda ids: model.item_out(None, ids),
            catalog,
            r.negatives,
            r.temperature,
            gen,
            r.negative_pool,
        )
        # Target-aware loss: at S target positions p, rank the true item w[p] among K negatives drawn for that
        # position, the candidate seeing history j < p only: exactly what serving computes at p = L.
        B, Lb = w.shape[0], w.shape[1] - 1  # this batch's width (padding columns dropped)
        n = wv.sum(1).to(torch.int64)  # valid items in the window of Lb+1
        first = Lb + 1 - n  # index of the oldest valid item; targets p need p-1 valid too: p in [first+1, Lb]
        span = (n - 1).clamp(min=1)
        pos_t = first.unsqueeze(1) + 1 + (torch.rand(B, S, generator=gen, device=dev) * span.unsqueeze(1)).long()
        pos_t = pos_t.clamp(max=Lb)
        pos_t[:, 0] = Lb  # always train the serving position (newest target)
        pm = (n >= 2).to(torch.float32).unsqueeze(1).expand(B, S)
        true_item = w.gather(1, pos_t)  # [B,S]
        negs = draw_items(catalog, (B, S, K), gen, dev)
        cand_item = torch.cat([true_item.unsqueeze(-1), negs], -1)  # [B,S,K+1]
        d = queries.shape[-1]
        q_at = queries.gather(1, (pos_t - 1).unsqueeze(-1).expand(B, S, d))  # query of prefix j < p
        scores = target_position_scores(model, k, v, q_at, ts, valid, cand_item, pos_t, wt.gather(1, pos_t))
        hit = torch.cat(
            [torch.zeros_like(true_item, dtype=torch.bool).unsqueeze(-1), negs == true_item.unsqueeze(-1)], -1
        )
        scores = scores.masked_fill(hit, MASKED_LOGIT)
        ce = F.cross_entropy(
            scores.reshape(B * S, K + 1), torch.zeros(B * S, dtype=torch.long, device=dev), reduction="none"
        )
        main = (ce * pm.flatten()).sum() / pm.sum().clamp(min=1)
        return main + r.aux_weight * aux

    vusers = _valid_users(ds, cfg.seed)

    def validate() -> dict:
        if r.valid_rerank:
            score = lambda h: ranker_scores_reranked(model, h, table, r.valid_rerank)  # noqa: E731
        else:
            score = lambda h: ranker_scores_full(model, h, table)  # noqa: E731
        return evaluate_scorer(ds, vusers, "valid", L, table, score)

    plan = FitPlan(r.epochs, r.patience, r.train_budget_s, r.batch_size, r.lr, r.eval_every, r.lr_decay, r.precision)
    model, info = _fit("ranker", model, plan, ds, step, validate, cfg.seed, log, table)
    return model, kwargs, info


# --------------------------------------------------------------------------------------------------
# SASRec baseline
# --------------------------------------------------------------------------------------------------
# What SASRec takes from [ranker] (its sizes, batches, negatives; not the ranker's budget or schedule): the build
# retrains it only when one of these or [sasrec] changes.
SASREC_FROM_RANKER = (
    "max_len",
    "d_model",
    "num_layers",
    "num_heads",
    "dropout",
    "temperature",
    "batch_size",
    "negatives",
    "negative_pool",
    "precision",
)


def sasrec_kwargs(cfg: BuildConfig, ds: Dataset, content_dim: int) -> dict:
    """SASRec shares the ranker's sizes (under its own argument names)."""
    d = cfg.model_dims(content_dim, ds.num_items)
    return {
        "content_dim": d.content_dim,
        "num_items": d.num_items,
        "max_len": d.max_len,
        "d": d.d_model,
        "layers": d.num_layers,
        "heads": d.num_heads,
        "dropout": cfg.ranker.dropout,
        "temperature": cfg.ranker.temperature,
    }


def train_sasrec(
    cfg: BuildConfig, ds: Dataset, emb16: np.ndarray, log=print, warm: np.ndarray | None = None
) -> tuple[SASRec, dict, dict]:
    seed_all(cfg.seed)
    r, c = cfg.ranker, cfg.sasrec
    table = content_table(emb16)
    kwargs = sasrec_kwargs(cfg, ds, emb16.shape[1])
    dev = train_device()
    table = table.to(dev)
    model = SASRec(**kwargs).to(dev)
    model.items.set_content_stats(table)
    L, N = r.max_len, ds.num_items
    batches, gen = _batcher(cfg, ds, dev), _generator(cfg.seed, dev)
    catalog = _negative_catalog(N, warm, dev)

    def step(users, rng):
        w, _, wv = batches(users, rng)
        item, valid = w[:, :-1], wv[:, :-1]
        q = model(None, item, valid)
        return sampled_softmax(
            q,
            w[:, 1:],
            wv[:, 1:] * valid,
            lambda ids: model.item_out(None, ids),
            catalog,
            r.negatives,
            r.temperature,
            gen,
            r.negative_pool,
        )

    vusers = _valid_users(ds, cfg.seed)

    def validate():
        return evaluate_scorer(ds, vusers, "valid", L, table, lambda h: sasrec_scores_full(model, h, table))

    plan = FitPlan(
        c.epochs, c.patience, c.train_budget_s, r.batch_size, c.lr, lr_decay=c.lr_decay, precision=r.precision
    )
    model, info = _fit("sasrec", model, plan, ds, step, validate, cfg.seed, log, table)
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


def train_towers(
    cfg: BuildConfig,
    ds: Dataset,
    emb16: np.ndarray,
    log=print,
    warm: np.ndarray | None = None,
    init: Path | None = None,
) -> tuple[TwoTower, dict, dict]:
    """`init`: a checkpoint to start from (a retrain), as train_ranker's."""
    seed_all(cfg.seed)
    t = cfg.towers
    table = content_table(emb16)
    kwargs = towers_kwargs(cfg, ds, emb16.shape[1])
    dev = train_device()
    table = table.to(dev)
    model = TwoTower(**kwargs).to(dev)
    if init is not None:
        log(f"towers: warm start from {init} (grown: {', '.join(warm_start(model, load_file(str(init)))) or '-'})")
    model.item_in.set_content_stats(table)
    model.user_in.set_content_stats(table)
    L, N = cfg.ranker.max_len, ds.num_items
    batches, gen = _batcher(cfg, ds, dev), _generator(cfg.seed, dev)
    catalog = _negative_catalog(N, warm, dev)

    def step(users, rng):
        w, _, wv = batches(users, rng)
        item, valid = w[:, :-1], wv[:, :-1]
        q = model.user_seq(None, item, valid)
        return sampled_softmax(
            q,
            w[:, 1:],
            wv[:, 1:] * valid,
            lambda ids: model.item_vec(None, ids),
            catalog,
            t.negatives,
            t.temperature,
            gen,
            t.negative_pool,
        )

    vusers = _valid_users(ds, cfg.seed)

    def validate():
        iv = all_item_vecs(model, table)
        return evaluate_scorer(ds, vusers, "valid", L, table, lambda h: towers_user_vec(model, h) @ iv.T)

    plan = FitPlan(t.epochs, t.patience, t.train_budget_s, t.batch_size, t.lr, lr_decay=t.lr_decay)
    model, info = _fit("towers", model, plan, ds, step, validate, cfg.seed, log, table)
    return model, kwargs, info


@torch.inference_mode()
def towers_user_vec(model: TwoTower, hist) -> torch.Tensor:
    emb, item, _, valid, _, _ = hist
    return model.user_seq(emb, item, valid)[:, -1]
