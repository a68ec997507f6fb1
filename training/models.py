"""Torch modules: item representation, LEARN towers, the target-aware HSTU ranker, and SASRec.

HSTU layer (arXiv 2402.17152):  LN(x) -> Linear -> SiLU -> split U,V,Q,K;
    A = SiLU(Q K^T + rab(pos, dt)) / max_len   (masked, no softmax);
    y = x + Linear(dropout(U * LN(A V))).
Inputs as the reference: item embedding x sqrt(d) + a learned absolute position, dropout. The time part of
rab for query position i and key j buckets (time of the event i predicts) - t_j: the next event's time, the
query time for the newest position (so `history` takes `query_ts`).
Target-aware (M-FALCON): candidate tokens come after the history; each attends to the history
positions before its target position and to itself, never to another candidate. History K/V do not
depend on candidates, so serving computes them once (`history_kv`) and scores microbatches with
`score_candidates`. Dividing by the constant max_len (not the actual length) keeps scores independent
of padding and of which candidates share a batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from service.contract import LOG_BUCKET  # one definition: the service keys its K/V cache on these buckets


class Dropout(nn.Dropout):
    """nn.Dropout with the CPU mask drawn by numpy's PCG64: torch's CPU bernoulli_ (mt19937, one thread) took
    ~1.2 ms per [16, 108, 50] activation, ~8 % of an HSTU training step on 2 cores; PCG64 takes ~0.3 ms.
    Seeded from torch's RNG on first use, so a seeded run stays deterministic. Identity in eval (export)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self._rng: np.random.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu":
            return super().forward(x)
        if self._rng is None:
            self._rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        keep = torch.from_numpy(self._rng.random(x.shape, dtype=np.float32)) >= self.p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


class ItemEmbedding(nn.Module):
    """Item token = projected LLM content embedding + learned ID embedding (zero for cold items, id 0).

    Decoder-LLM hidden states are highly anisotropic (SmolLM2 mean-pooled titles: mean cosine 0.94,
    a few dimensions 50x the rest), so content is standardised per dimension with catalog statistics
    (buffers, exported with the graph) before the projection.
    """

    def __init__(self, content_dim: int, d: int, num_items: int, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("content_mean", torch.zeros(content_dim))
        self.register_buffer("content_std", torch.ones(content_dim))
        self.proj = nn.Linear(content_dim, d)
        # Content starts on the same footing as the IDs (std 0.02 per output dim for standardised inputs):
        # the default init made it ~30x larger, so the ID embeddings barely moved the input.
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(content_dim))
        nn.init.zeros_(self.proj.bias)
        self.ids = nn.Embedding(num_items + 1, d, padding_idx=0)
        nn.init.normal_(self.ids.weight, std=0.02)
        with torch.no_grad():
            self.ids.weight[0].zero_()
        self.drop = Dropout(dropout)
        self.folded = False  # see fold_standardisation
        self._catalog: torch.Tensor | None = None  # see training_catalog
        self._standard: torch.Tensor | None = None  # see _standardised

    def set_content_stats(self, table: torch.Tensor) -> None:
        """Standardisation statistics from the catalog's content embeddings (rows 1..N; row 0 is padding)."""
        with torch.no_grad():
            self.content_mean.copy_(table[1:].mean(0))
            self.content_std.copy_(table[1:].std(0).clamp(min=1e-3))
        self._standard = None

    def forward(self, content: torch.Tensor | None, idx: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        if self._catalog is not None:
            e = self._by_unique_id(idx)
        else:
            assert content is not None, "content embeddings are needed outside training_catalog()"
            z = content if self.folded else (content - self.content_mean) / self.content_std
            e = self.proj(z) + self.ids(idx)
        return self.drop(e) if dropout else e

    def _by_unique_id(self, idx: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(idx, return_inverse=True)
        return (self.proj(self._standardised()[uniq]) + self.ids(uniq))[inv]

    def _standardised(self) -> torch.Tensor:
        """The catalog's standardised content, computed once per training_catalog (and again after
        set_content_stats), not on every call: that was two elementwise passes over [~1,500, E] three times
        per ranker step. A normal tensor even when validation (inference mode) asks first, so training can
        backpropagate through what it is indexed with."""
        if self._standard is None:
            with torch.inference_mode(False), torch.no_grad():
                self._standard = (self._catalog - self.content_mean) / self.content_std
        return self._standard

    @contextmanager
    def training_catalog(self, table: torch.Tensor) -> Iterator[None]:
        """Within it, items are looked up by id in `table` [N+1, E] and `content` may be None.

        In training every token's embedding is a function of its item id alone (no cold items), so it is
        computed once per distinct item of the call, not once per token: on ML-1M a batch holds ~25,000
        history tokens but ~3,000 distinct items, and the per-token standardisation + projection was half
        of a SASRec step. Serving and export never enter it (cold items share id 0 but not content).
        """
        self._catalog, self._standard = table, None
        try:
            yield
        finally:
            self._catalog, self._standard = None, None

    def fold_standardisation(self) -> None:
        """For export: W((c-mu)/sigma) + b == (W/sigma) c + (b - (W/sigma) mu), so the served graph skips two
        elementwise passes over every [tokens, E] input. Computed in float64; |mu/sigma| is ~12 for SmolLM2,
        so the cancellation this trades for costs ~1e-6 relative."""
        with torch.no_grad():
            w = self.proj.weight.double() / self.content_std.double()
            b = self.proj.bias.double() - w @ self.content_mean.double()
            self.proj.weight.copy_(w.to(self.proj.weight.dtype))
            self.proj.bias.copy_(b.to(self.proj.bias.dtype))
            self.content_mean.zero_()
            self.content_std.fill_(1.0)
        self.folded = True


class RelativeBias(nn.Module):
    """rab(pos, dt): a learned scalar per relative position and per log-time bucket."""

    def __init__(self, max_len: int, num_buckets: int):
        super().__init__()
        self.max_len = max_len
        self.num_buckets = num_buckets
        self.pos_w = nn.Parameter(torch.zeros(max_len + 1))
        self.ts_w = nn.Parameter(torch.zeros(num_buckets + 1))

    def bucket(self, dt: torch.Tensor) -> torch.Tensor:
        dt = dt.abs().clamp(min=1).to(torch.float32)
        return (torch.log(dt) / LOG_BUCKET).floor().clamp(0, self.num_buckets).to(torch.int64)

    def forward(self, dist: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        # F.embedding exports as ONNX Gather; `w[idx]` becomes GatherND, ~6x slower in ONNX Runtime on CPU.
        return _lookup(self.pos_w, dist.clamp(0, self.max_len)) + _lookup(self.ts_w, self.bucket(dt))

    def grid(self, length: int, dt: torch.Tensor) -> torch.Tensor:
        """forward() over a history's [L, L] grid (dist = i - j), arranged for ONNX Runtime on CPU (the served
        history graph; same values): the position term is a slice of a [max_len, max_len] table of weights
        only (folded when the graph loads), |dt| is taken in float32 (exact: the cast is monotonic and odd;
        int64 Abs/Clip are ~3x slower), and the time term is one GatherElements (a Gather of one-element rows
        costs ~7 ns an index: ~300 us of a 200-event history's ~2 ms)."""
        p = torch.arange(self.max_len, device=dt.device)
        table = self.pos_w[(p.unsqueeze(1) - p.unsqueeze(0)).clamp(0, self.max_len)]
        dt = dt.to(torch.float32).abs().clamp(min=1)
        buckets = (torch.log(dt) / LOG_BUCKET).floor().clamp(0, self.num_buckets).to(torch.int64)
        return table[:length, :length] + self.ts_w.gather(0, buckets.reshape(-1)).view(buckets.shape)


# Attention as batched MatMul: ONNX Runtime's CPU Einsum is ~2x slower on these shapes.
def _qk(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B,I,H,D] x [B,J,H,D] -> [B,H,I,J]"""
    return q.transpose(1, 2) @ k.permute(0, 2, 3, 1)


def _av(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B,H,I,J] x [B,J,H,D] -> [B,I,H,D]"""
    return (a @ v.transpose(1, 2)).transpose(1, 2)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and table.requires_grad:
        return _BiasLookup.apply(table, idx)
    return F.embedding(idx, table.unsqueeze(-1)).squeeze(-1)


class _BiasLookup(torch.autograd.Function):
    """table[idx] for a tiny table and millions of indices (the [B,L,L] time biases), with a bincount
    backward: embedding's own backward took 45% of an HSTU training step on CPU."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = table.shape[0]
        return table[idx]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (idx,) = ctx.saved_tensors
        g = torch.bincount(idx.reshape(-1), weights=grad.reshape(-1).to(torch.float64), minlength=ctx.rows)
        return g.to(grad.dtype), None


class HSTULayer(nn.Module):
    def __init__(self, d: int, heads: int, dqk: int, dv: int, dropout: float):
        super().__init__()
        self.h, self.dqk, self.dv = heads, dqk, dv
        self.ln_in = nn.LayerNorm(d)
        self.uvqk = nn.Linear(d, heads * (2 * dv + 2 * dqk))
        self.ln_attn = nn.LayerNorm(heads * dv)
        self.out = nn.Linear(heads * dv, d)
        self.drop = Dropout(dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, dv, dqk = self.h, self.dv, self.dqk
        u, v, q, k = torch.split(F.silu(self.uvqk(self.ln_in(x))), [h * dv, h * dv, h * dqk, h * dqk], dim=-1)
        return u, v, q, k

    def finish(self, x: torch.Tensor, u: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.drop(u * self.ln_attn(attn)))


class HSTURanker(nn.Module):
    def __init__(
        self,
        content_dim: int,
        num_items: int,
        max_len: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        dqk: int,
        dv: int,
        dropout: float = 0.2,
        num_time_buckets: int = 64,
        temperature: float = 0.05,
    ):
        super().__init__()
        self.max_len, self.h, self.dqk, self.dv = max_len, num_heads, dqk, dv
        self.temperature = temperature
        self.items = ItemEmbedding(content_dim, d_model, num_items, dropout)
        self.input_scale = math.sqrt(d_model)  # the reference scales item embeddings by sqrt(d) ...
        self.pos = _position_table(max_len + 1, d_model)  # ... and adds a learned absolute position
        self.cand_type = nn.Parameter(torch.zeros(d_model))
        self.rab = RelativeBias(max_len, num_time_buckets)
        self.layers = nn.ModuleList(HSTULayer(d_model, num_heads, dqk, dv, dropout) for _ in range(num_layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.score_proj = nn.Linear(d_model, d_model)
        # Target-aware correction read off the candidate token after it has attended to the history.
        self.cand_head = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, 1))

    # --- helpers -----------------------------------------------------------------------------------
    def _heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.reshape(*t.shape[:-1], self.h, dim)

    def _pointwise(self, logits: torch.Tensor) -> torch.Tensor:
        return F.silu(logits) / self.max_len

    def item_out(self, content: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        """Item side of the score: the same item representation, L2-normalised (no dropout on targets)."""
        return F.normalize(self.item_token(content, idx), dim=-1)

    def item_token(self, content: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        """What a candidate brings of itself: a function of the item alone (content + ID), so serving computes it
        once per item at export (ranker_item) instead of projecting every candidate's content per request."""
        return self.items(content, idx, dropout=False)

    def _tokens(
        self, content: torch.Tensor | None, idx: torch.Tensor | None, abs_pos: torch.Tensor, token: torch.Tensor | None
    ) -> torch.Tensor:
        """Input token: item embedding x sqrt(d) + absolute position (counted from the window's oldest item).
        `token`: the items' item_token, precomputed (serving), instead of content + ID."""
        e = self.items(content, idx, dropout=False) if token is None else token
        x = e * self.input_scale + self.pos(abs_pos.clamp(0, self.max_len))
        return self.items.drop(x)

    # --- history (causal) --------------------------------------------------------------------------
    def history(
        self,
        hist_emb: torch.Tensor | None,
        hist_item: torch.Tensor | None,
        hist_ts: torch.Tensor,
        hist_valid: torch.Tensor,
        query_ts: torch.Tensor,
        serving: bool = False,
        hist_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the history stack. Returns (final hidden [B,L,d], K [B,NL,L,H*dqk], V [B,NL,L,H*dv]).
        `serving` builds the bias and the causal mask the way the exported graph runs them fastest (same values).
        Serving passes `hist_token` [B,L,d], each item's item_token precomputed per item, for hist_emb/hist_item.

        Time bias as in the reference: position i attends to j with dt = (time of the event i predicts, i.e.
        the next one; `query_ts` [B,1] for the newest) - ts[j]. So the newest position's output, and with more
        than one layer the last K/V row, depend on the query time (through its log-time buckets only).
        """
        B, L = hist_ts.shape
        abs_pos = (torch.cumsum(hist_valid, 1) - 1).to(torch.int64)
        x = self._tokens(hist_emb, hist_item, abs_pos, hist_token) * hist_valid.unsqueeze(-1)
        pos = torch.arange(L, device=x.device)
        dist = pos.unsqueeze(1) - pos.unsqueeze(0)  # i - j
        next_ts = torch.cat([hist_ts[:, 1:], query_ts], 1)
        dt = next_ts.unsqueeze(2) - hist_ts.unsqueeze(1)
        if serving:
            rab = self.rab.grid(L, dt)  # [B,L,L]
            causal = torch.ones(self.max_len, self.max_len, device=x.device).tril()[:L, :L]
        else:
            rab = self.rab(dist.unsqueeze(0), dt)
            causal = (dist >= 0).to(x.dtype)
        mask = causal.unsqueeze(0) * hist_valid.unsqueeze(1)  # causal, valid keys
        ks, vs = [], []
        for layer in self.layers:
            u, v, q, k = layer.project(x)
            ks.append(k)
            vs.append(v)
            logits = _qk(self._heads(q, self.dqk), self._heads(k, self.dqk))
            a = self._pointwise(logits + rab.unsqueeze(1)) * mask.unsqueeze(1)
            attn = _av(a, self._heads(v, self.dv)).reshape(B, L, -1)
            x = layer.finish(x, u, attn)
        return x, torch.stack(ks, 1), torch.stack(vs, 1)

    # --- candidates (M-FALCON) ---------------------------------------------------------------------
    def candidates(
        self,
        hist_k: torch.Tensor,  # [B,NL,L,H*dqk]
        hist_v: torch.Tensor,  # [B,NL,L,H*dv]
        hist_q: torch.Tensor,  # [B,M|1,d] next-item query of the history prefix each candidate sees
        hist_ts: torch.Tensor,  # [B,L]
        hist_valid: torch.Tensor,  # [B,L]
        cand_emb: torch.Tensor | None,  # [B,M,E]
        cand_item: torch.Tensor,  # [B,M]
        cand_pos: torch.Tensor,  # [B,M] or [B,1] index of the target position: attends to history j < cand_pos
        cand_ts: torch.Tensor,  # [B,M] or [B,1]
        cand_token: torch.Tensor | None = None,  # [B,M,d] item_token of each candidate, instead of emb + item
    ) -> torch.Tensor:
        """Scores [B,M]. Each candidate sees history j < cand_pos and itself, nothing else.

        Serving puts every candidate at the same position and time: pass cand_pos/cand_ts as [B,1] and the
        relative bias and mask are computed once per user instead of once per candidate (broadcast, same values).
        Serving also passes `cand_token`, precomputed per item (see item_token), for cand_emb/cand_item.
        """
        e_raw = self.item_token(cand_emb, cand_item) if cand_token is None else cand_token
        B, M = e_raw.shape[:2]
        L = hist_ts.shape[1]
        e_out = F.normalize(e_raw, dim=-1)  # target side of the score: no dropout (== item_out)
        j = torch.arange(L, device=e_raw.device)
        dist = cand_pos.unsqueeze(-1) - j  # [B,M,L]
        # Absolute position of the candidate = number of valid history items before it (serving: all).
        abs_pos = ((dist > 0).to(hist_valid.dtype) * hist_valid.unsqueeze(1)).sum(-1).to(torch.int64)
        pos_emb = self.pos(abs_pos.clamp(0, self.max_len))
        x = self.items.drop(e_raw * self.input_scale + pos_emb) + self.cand_type
        rab = self.rab(dist, cand_ts.unsqueeze(-1) - hist_ts.unsqueeze(1))  # [B,M|1,L]
        mask = (dist > 0).to(x.dtype) * hist_valid.unsqueeze(1)
        self_rab = self.rab(torch.zeros_like(cand_pos), torch.zeros_like(cand_pos))  # [B,M|1]
        for li, layer in enumerate(self.layers):
            u, v, q, k = layer.project(x)
            qh, kh, vh = self._heads(q, self.dqk), self._heads(k, self.dqk), self._heads(v, self.dv)
            hk = self._heads(hist_k[:, li], self.dqk)
            hv = self._heads(hist_v[:, li], self.dv)
            logits = _qk(qh, hk)
            a = self._pointwise(logits + rab.unsqueeze(1)) * mask.unsqueeze(1)
            a_self = self._pointwise((qh * kh).sum(-1) + self_rab.unsqueeze(-1))  # [B,M,H]
            attn = _av(a, hv) + a_self.unsqueeze(-1) * vh
            x = layer.finish(x, u, attn.reshape(B, M, -1))
        # Score = HSTU's next-item score (history query . item) + a target-aware term from the candidate
        # token, which has attended to the history with its own query and gated it with its own U.
        base = (hist_q * e_out).sum(-1) / self.temperature
        return base + self.cand_head(self.ln_out(x)).squeeze(-1)

    def candidates_at_end(
        self,
        hist_k: torch.Tensor,  # [B,NL,L,H*dqk]
        hist_v: torch.Tensor,  # [B,NL,L,H*dv]
        hist_q: torch.Tensor,  # [B,1,d]
        hist_ts: torch.Tensor,  # [B,L]
        hist_valid: torch.Tensor,  # [B,L]
        query_ts: torch.Tensor,  # [B,1]
        cand_token: torch.Tensor,  # [B,M,d]
    ) -> torch.Tensor:
        """candidates() in serving's case, every candidate after the whole history at the query time: the same
        scores, arranged for ONNX Runtime on a CPU (1.3x faster there for 1,000 candidates, docs/performance.md).
        - The relative bias, the same for every candidate, rides the QK matmul as one more key column (queries
          get a column of ones); the key mask and 1/max_len scale the values instead of the [M,L] weights, so
          the weights take one pass (x * sigmoid(x), which ONNX Runtime fuses) instead of five.
        - Per-candidate tensors are 2-D [B*M, d]: each linear becomes one Gemm with its bias inside, and the
          fused u/v/q/k projection is four Gemms instead of one MatMul, an Add and a Split that copies.
        - The next-item term is one matrix-vector product divided by the token norms (no normalised copy).
        - The self-attention bias rab(0, 0) is a constant of the weights; one head has its own attention step."""
        B, M, d = cand_token.shape
        L, H, dqk, dv = hist_ts.shape[1], self.h, self.dqk, self.dv
        abs_pos = hist_valid.sum(1, keepdim=True).to(torch.int64)  # [B,1]: every valid history item is before
        x = cand_token * self.input_scale + (self.pos(abs_pos.clamp(0, self.max_len)) + self.cand_type)
        x = x.reshape(B * M, d)
        dist = torch.full_like(hist_ts, L) - torch.arange(L, device=hist_ts.device)  # [B,L], all > 0
        rab = self.rab(dist, query_ts - hist_ts)  # [B,L]
        self_rab = self.rab.pos_w[0] + self.rab.ts_w[0]  # rab(0, 0): |dt| clamps to 1, log 1 = bucket 0
        value_scale = hist_valid / self.max_len  # [B,L]
        attend = self._attend_one_head if H == 1 else self._attend_heads
        cuts = [0, H * dv, 2 * H * dv, 2 * H * dv + H * dqk, 2 * H * (dv + dqk)]  # u, v, q, k as in project()
        for li, layer in enumerate(self.layers):
            h, w, b = layer.ln_in(x), layer.uvqk.weight, layer.uvqk.bias
            u, v, q, k = (F.silu(F.linear(h, w[a:c], b[a:c])) for a, c in zip(cuts[:-1], cuts[1:], strict=True))
            attn = attend(q.reshape(B, M, -1), k, v, hist_k[:, li], hist_v[:, li], rab, self_rab, value_scale)
            x = x + layer.out(u * layer.ln_attn(attn))  # layer.finish(), dropout being off
        base = (cand_token @ hist_q.transpose(1, 2)).squeeze(-1)  # [B,M]: next-item query . token
        base = base / cand_token.norm(dim=-1).clamp(min=1e-12) / self.temperature  # F.normalize's eps
        return base + self.cand_head(self.ln_out(x)).reshape(B, M)

    def _attend_heads(
        self, q: Tensor, k: Tensor, v: Tensor, hk: Tensor, hv: Tensor, rab: Tensor, self_rab: Tensor, scale: Tensor
    ) -> Tensor:
        """candidates_at_end()'s attention of candidates q [B,M,H*dqk] (k, v [B*M,.]) over one layer's history K/V
        hk, hv [B,L,H*d] (the relative bias rab [B,L], the value scale [B,L]) and themselves (rab(0, 0) a scalar):
        [B*M,H*dv]."""
        (B, M, _), (L, H, dqk, dv) = q.shape, (rab.shape[1], self.h, self.dqk, self.dv)
        qh, kh, vh = q.reshape(B, M, H, dqk), k.reshape(B, M, H, dqk), v.reshape(B, M, H, dv)
        hk = torch.cat([self._heads(hk, dqk), rab.reshape(B, L, 1, 1).expand(B, L, H, 1)], -1)  # [B,L,H,dqk+1]
        hv = self._heads(hv, dv) * scale.reshape(B, L, 1, 1)
        ones = torch.ones(B, M, H, 1, dtype=q.dtype, device=q.device)
        a = F.silu(_qk(torch.cat([qh, ones], -1), hk))  # [B,H,M,L] = silu(q.k + rab)
        a_self = self._pointwise((qh * kh).sum(-1) + self_rab)  # [B,M,H]
        return (_av(a, hv) + a_self.unsqueeze(-1) * vh).reshape(B * M, H * dv)

    def _attend_one_head(
        self, q: Tensor, k: Tensor, v: Tensor, hk: Tensor, hv: Tensor, rab: Tensor, self_rab: Tensor, scale: Tensor
    ) -> Tensor:
        """_attend_heads() with one head (the ml1m model; same arguments and shapes): no head axis, so the attention
        is two batched matmuls over [B,M,.] with no transposes or reshapes of per-candidate tensors around them
        (170 -> 137 nodes in the exported graph, docs/performance.md)."""
        B, M, _ = q.shape
        hk = torch.cat([hk, rab.unsqueeze(-1)], -1)  # [B,L,dqk+1]
        ones = torch.ones(B, M, 1, dtype=q.dtype, device=q.device)
        a = F.silu(torch.cat([q, ones], -1) @ hk.transpose(1, 2))  # [B,M,L] = silu(q.k + rab)
        attn = (a @ (hv * scale.unsqueeze(-1))).reshape(B * M, self.dv)
        # [B*M], not [B*M,1]: ONNX Runtime's Add/Div of a scalar into an [N,1] tensor took ~3x its time on [N].
        a_self = self._pointwise((q.reshape(B * M, -1) * k).sum(-1) + self_rab)
        return attn + a_self.unsqueeze(-1) * v

    def next_item_query(self, hidden: torch.Tensor) -> torch.Tensor:
        """Autoregressive head on history outputs (auxiliary training signal, as in plain HSTU)."""
        return F.normalize(self.score_proj(self.ln_out(hidden)), dim=-1)

    def score_full(
        self,
        hist_emb: torch.Tensor | None,
        hist_item: torch.Tensor,
        hist_ts: torch.Tensor,
        hist_valid: torch.Tensor,
        query_ts: torch.Tensor,
        cand_emb: torch.Tensor | None,
        cand_item: torch.Tensor,
    ) -> torch.Tensor:
        """Reference path: one pass over history + all candidates with the M-FALCON mask."""
        hidden, k, v = self.history(hist_emb, hist_item, hist_ts, hist_valid, query_ts)
        B, M = cand_item.shape
        L = hist_item.shape[1]
        pos = torch.full((B, M), L, dtype=torch.int64, device=cand_item.device)
        q = self.next_item_query(hidden[:, -1]).unsqueeze(1).expand(B, M, -1)
        return self.candidates(k, v, q, hist_ts, hist_valid, cand_emb, cand_item, pos, query_ts.expand(B, M))


# --------------------------------------------------------------------------------------------------
# Softmax-attention encoder shared by SASRec and the LEARN user tower.
# --------------------------------------------------------------------------------------------------
class CausalBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.h = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), Dropout(dropout), nn.Linear(4 * d, d))
        self.drop = Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        last_only: bool = False,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """New hidden states and this block's keys and values of `x`'s positions ([B,L,heads,D/heads] each).

        `last_only`: queries from the last position only (serving reads nothing else): [B,1,D] out. `past`: keys
        and values of earlier positions, attended before `x`'s own (`bias` then spans past + new keys)."""
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, L, 3, self.h, D // self.h).unbind(2)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
        if last_only:
            q, x, bias = q[:, -1:], x[:, -1:], bias[:, -1:]
        logits = _qk(q * (1.0 / math.sqrt(D // self.h)), keys) + bias.unsqueeze(1)
        a = torch.softmax(logits, dim=-1)
        x = x + self.drop(self.proj(_av(a, values).reshape(B, q.shape[1], D)))
        return x + self.drop(self.ff(self.ln2(x))), k, v


class CausalEncoder(nn.Module):
    """`positions`: "newest" counts them back from the newest item (SASRec); "oldest" counts them from the oldest
    valid item (the user tower), so an appended event leaves every earlier position, and with the causal mask
    every earlier key and value, as they were: `extend` computes only the new positions."""

    def __init__(self, d: int, layers: int, heads: int, max_len: int, dropout: float, positions: str = "newest"):
        super().__init__()
        if positions not in ("newest", "oldest"):
            raise ValueError(f"positions must be 'newest' or 'oldest', got {positions!r}")
        self.pos = _position_table(max_len, d)
        self.blocks = nn.ModuleList(CausalBlock(d, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.drop = Dropout(dropout)
        self.max_len = max_len
        self.positions = positions

    def _positions(self, valid: torch.Tensor) -> torch.Tensor:
        L = valid.shape[1]
        if self.positions == "oldest":  # left padding: the first valid item is position 0
            return (torch.cumsum(valid, 1) - 1).clamp(0, self.max_len - 1).to(torch.int64)
        return (L - 1 - torch.arange(L, device=valid.device)).clamp(max=self.max_len - 1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Hidden states [B,L,d]; with `last_only`, the last position's [B,1,d] (the last block skips the rest)."""
        B, L, _ = x.shape
        # Either way left padding does not shift the positions.
        x = self.drop(x + self.pos(self._positions(valid))) * valid.unsqueeze(-1)
        i = torch.arange(L, device=x.device)
        allowed = (i.unsqueeze(1) >= i.unsqueeze(0)).unsqueeze(0) & (valid.unsqueeze(1) > 0)
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device).unsqueeze(0)  # no empty rows
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, -1e9)
        return self._blocks(x, bias, last_only, None, keep_kv=False)[0]

    def forward_kv(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last position's hidden state [B,1,d] and every block's keys and values [B,layers,L,d] (heads
        side by side): the state `extend` continues from. Needs positions="oldest"."""
        if self.positions != "oldest":
            raise ValueError("only an encoder with positions='oldest' can be extended")
        B, L, _ = x.shape
        x = self.drop(x + self.pos(self._positions(valid))) * valid.unsqueeze(-1)
        i = torch.arange(L, device=x.device)
        allowed = (i.unsqueeze(1) >= i.unsqueeze(0)).unsqueeze(0) & (valid.unsqueeze(1) > 0)
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=x.device).unsqueeze(0)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, -1e9)
        return self._blocks(x, bias, True, None)

    def extend(
        self, x_new: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward_kv` of a history whose first P items (no padding) gave `past_k`/`past_v` [B,layers,P,d] and
        whose N newer items are `x_new` [B,N,d]: computes the N new positions only. Returns the newest
        position's hidden state [B,1,d] and the new positions' keys and values [B,layers,N,d]. Equal to the full
        pass while P + N <= max_len (beyond it the window slides, every position moves: recompute)."""
        if self.positions != "oldest":
            raise ValueError("only an encoder with positions='oldest' can be extended")
        N, P = x_new.shape[1], past_k.shape[2]
        pos = (P + torch.arange(N, device=x_new.device)).clamp(max=self.max_len - 1)
        x = self.drop(x_new + self.pos(pos))
        i = torch.arange(N, device=x_new.device)
        causal = torch.zeros(N, N, dtype=x.dtype, device=x.device).masked_fill(i.unsqueeze(1) < i.unsqueeze(0), -1e9)
        bias = torch.cat([torch.zeros(N, P, dtype=x.dtype, device=x.device), causal], 1).unsqueeze(0)
        return self._blocks(x, bias, True, (past_k, past_v))

    def _blocks(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        last_only: bool,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        keep_kv: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        B, L, D = x.shape
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        for i, b in enumerate(self.blocks):
            layer_past = None
            if past is not None:
                P = past[0].shape[2]
                layer_past = (
                    past[0][:, i].reshape(B, P, b.h, D // b.h),
                    past[1][:, i].reshape(B, P, b.h, D // b.h),
                )
            x, k, v = b(x, bias, last_only and i == len(self.blocks) - 1, layer_past)
            if keep_kv:
                ks.append(k.reshape(B, L, D))
                vs.append(v.reshape(B, L, D))
        if not keep_kv:
            return self.ln(x), None, None
        return self.ln(x), torch.stack(ks, 1), torch.stack(vs, 1)


class SASRec(nn.Module):
    """Baseline ranker: causal softmax attention over item tokens; next item = dot with item embeddings."""

    def __init__(
        self,
        content_dim: int,
        num_items: int,
        max_len: int,
        d: int,
        layers: int,
        heads: int,
        dropout: float = 0.2,
        temperature: float = 0.05,
    ):
        super().__init__()
        self.items = ItemEmbedding(content_dim, d, num_items, dropout)
        self.enc = CausalEncoder(d, layers, heads, max_len, dropout)
        self.input_scale = math.sqrt(d)
        self.temperature = temperature

    def forward(self, hist_emb: torch.Tensor | None, hist_item: torch.Tensor, hist_valid: torch.Tensor) -> torch.Tensor:
        x = self.items(hist_emb, hist_item, dropout=False) * self.input_scale  # the encoder adds dropout
        return F.normalize(self.enc(x, hist_valid), dim=-1)

    def item_out(self, content: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.items(content, idx, dropout=False), dim=-1)


class TwoTower(nn.Module):
    """LEARN towers: item = MLP(content + id); user = causal transformer over history items, last position."""

    def __init__(
        self,
        content_dim: int,
        num_items: int,
        max_len: int,
        d: int,
        layers: int,
        heads: int,
        dropout: float = 0.1,
        temperature: float = 0.05,
    ):
        super().__init__()
        self.temperature = temperature
        self.item_in = ItemEmbedding(content_dim, d, num_items, dropout)
        self.item_mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.user_in = ItemEmbedding(content_dim, d, num_items, dropout)
        self.user_enc = CausalEncoder(d, layers, heads, max_len, dropout, positions="oldest")
        self.input_scale = math.sqrt(d)
        self.user_out = nn.Linear(d, d)

    def item_vec(self, content: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.item_mlp(self.item_in(content, idx)), dim=-1)

    def user_seq(
        self, hist_emb: torch.Tensor | None, hist_item: torch.Tensor, hist_valid: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """User vector at every position [B,L,d] (training uses all), or at the last one [B,1,d] (serving)."""
        x = self.user_in(hist_emb, hist_item, dropout=False) * self.input_scale  # the encoder adds dropout
        h = self.user_enc(x, hist_valid, last_only)
        return F.normalize(self.user_out(h), dim=-1)

    def user_token(self, content: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        """The user tower's input for one history item, a function of the item alone (content + ID): the build
        computes it once per item (item_tower's `user_token`), so serving gathers it instead of fetching and
        projecting content embeddings per request."""
        return self.user_in(content, idx, dropout=False)

    def user_state(self, hist_token: torch.Tensor, hist_valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """User vector [B,T] and the encoder's keys/values [B,layers,L,d] that `user_extend` continues from, over
        the history items' `user_token`s [B,L,d]."""
        h, k, v = self.user_enc.forward_kv(hist_token * self.input_scale, hist_valid)
        return F.normalize(self.user_out(h[:, -1]), dim=-1), k, v

    def user_extend(
        self, new_token: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`user_state` of the history grown by the items of `new_token` [B,N,d], computing only the N new positions."""
        h, k, v = self.user_enc.extend(new_token * self.input_scale, past_k, past_v)
        return F.normalize(self.user_out(h[:, -1]), dim=-1), k, v


def _position_table(n: int, d: int) -> nn.Embedding:
    """Learned positions, initialised with std 1/sqrt(d) as the reference (nn.Embedding's default is 1)."""
    table = nn.Embedding(n, d)
    nn.init.normal_(table.weight, std=1.0 / math.sqrt(d))
    return table


def one_pass(
    model: HSTURanker,
    hist_emb: torch.Tensor,
    hist_item: torch.Tensor,
    hist_ts: torch.Tensor,
    hist_valid: torch.Tensor,
    query_ts: torch.Tensor,
    cand_emb: torch.Tensor,
    cand_item: torch.Tensor,
    mask: str = "falcon",
) -> torch.Tensor:
    """Scores from ONE pass over the concatenated sequence [history; candidates] with an explicit mask.

    Written independently of `history`/`candidates` so tests can check the cached M-FALCON path against
    it. mask="falcon": candidates see the history and themselves only. mask="causal": the naive way,
    candidates also see the candidates before them (scores then depend on the batch); for benchmarks.
    """
    B, L = hist_item.shape
    M = cand_item.shape[1]
    T = L + M
    hist_pos = (torch.cumsum(hist_valid, 1) - 1).to(torch.int64)
    hidden_h = model._tokens(hist_emb, hist_item, hist_pos, None) * hist_valid.unsqueeze(-1)
    cand_pos = hist_valid.sum(1, keepdim=True).to(torch.int64).expand(B, M)
    x = torch.cat([hidden_h, model._tokens(cand_emb, cand_item, cand_pos, None) + model.cand_type], 1)
    ts = torch.cat([hist_ts, query_ts.expand(B, M)], 1)  # keys: each event's own time
    # queries: the time of the event each position predicts (the next one; the query time for the newest
    # history position and for every candidate)
    ts_q = torch.cat([hist_ts[:, 1:], query_ts.expand(B, M + 1)], 1)
    pos = torch.cat([torch.arange(L), torch.full((M,), L)]).to(hist_item.device)
    dist = pos.unsqueeze(1) - pos.unsqueeze(0)
    rab = model.rab(dist.unsqueeze(0).expand(B, T, T), ts_q.unsqueeze(2) - ts.unsqueeze(1))
    valid = torch.cat([hist_valid, torch.ones(B, M, dtype=hist_valid.dtype, device=hist_valid.device)], 1)
    idx = torch.arange(T, device=hist_item.device)
    allowed = idx.unsqueeze(1) >= idx.unsqueeze(0)  # causal
    if mask == "falcon":
        is_cand = idx >= L
        allowed = allowed & ~(is_cand.unsqueeze(1) & is_cand.unsqueeze(0) & (idx.unsqueeze(1) != idx.unsqueeze(0)))
    m = allowed.unsqueeze(0).to(x.dtype) * valid.unsqueeze(1)
    for layer in model.layers:
        u, v, q, k = layer.project(x)
        logits = torch.einsum("bihd,bjhd->bhij", model._heads(q, model.dqk), model._heads(k, model.dqk))
        a = model._pointwise(logits + rab.unsqueeze(1)) * m.unsqueeze(1)
        attn = torch.einsum("bhij,bjhd->bihd", a, model._heads(v, model.dv)).reshape(B, T, -1)
        x = layer.finish(x, u, attn)
    q_user = model.next_item_query(x[:, L - 1]).unsqueeze(1)
    base = (q_user * model.item_out(cand_emb, cand_item)).sum(-1) / model.temperature
    return base + model.cand_head(model.ln_out(x[:, L:])).squeeze(-1)
