"""The one contract between offline and online: model names, tensor names, dtypes and shapes.

Exporters write ONNX graphs and Triton `config.pbtxt` files from these specs; the service builds its
inputs from them; tests check every ONNX file against them. Nothing else restates a tensor name.

Shapes are given with the batch dimension first. `-1` is dynamic; other dims are resolved from
`ModelDims`, which the build writes into `manifest.json` next to the repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ITEM_TOWER = "item_tower"
USER_TOWER = "user_tower"
# The user tower continued from its cached keys/values over the events appended since (positions count from the
# oldest item, so earlier positions never change): a history grown by one event costs one position, not L.
USER_TOWER_EXTEND = "user_tower_extend"
RANKER_HISTORY = "ranker_history"
RANKER_CANDIDATES = "ranker_candidates"
RANKER_ITEM = "ranker_item"  # a candidate's input token: a function of the item alone, precomputed per item
MODEL_NAMES = (ITEM_TOWER, USER_TOWER, USER_TOWER_EXTEND, RANKER_HISTORY, RANKER_CANDIDATES, RANKER_ITEM)
# ranker_item's output for every catalog item [N+1, d_model] (row 0 unused), written beside the FAISS index by
# the build; the service gathers candidates' and history items' tokens from it instead of their content embeddings,
# and items added live get theirs from ranker_item when they join the index.
ITEM_TOKENS_FILE = "ranker_item_tokens.npy"
# item_tower's `user_token` for every catalog item [N+1, tower_dim] (row 0 unused): the user tower's input per
# history item, gathered the same way. With both tables a request needs no content embedding at all.
USER_TOKENS_FILE = "user_item_tokens.npy"

MANIFEST = "falconrec.json"  # written at the repository root by the exporter
ONNX_FILE = "model.onnx"
# Beside an int8 model.onnx (`[serve] int8`, exporters/quantize.py): the fp32 graph it was made from. A GPU session
# loads this one (the int8 graphs are CPU kernels), and a rebuild quantizes from it.
FP32_ONNX_FILE = "model.fp32.onnx"
QUANTIZATION_REPORT = "quantization.json"  # in the repository: the int8 quality check's verdict and numbers
MODEL_VERSION_DIR = "1"

# Triton's names for numpy dtypes (config.pbtxt `data_type`).
TRITON_DTYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "float16": "TYPE_FP16"}


@dataclass(frozen=True)
class ModelDims:
    content_dim: int  # E: LLM content-embedding width
    tower_dim: int  # retrieval space width
    max_len: int  # longest history the ranker and user tower take
    d_model: int
    num_layers: int
    num_heads: int
    dqk: int
    dv: int
    num_items: int  # items with a learned ID embedding (indices 1..num_items); 0 = cold/padding
    num_time_buckets: int = 64  # the ranker's log-time buckets (see time_buckets)
    tower_layers: int = 2  # the user tower's blocks (its keys/values: [B, tower_layers, L, tower_dim])

    @property
    def k_width(self) -> int:
        return self.num_heads * self.dqk

    @property
    def v_width(self) -> int:
        return self.num_heads * self.dv


LOG_BUCKET = 0.301  # HSTU's log-time bucket width (natural log of seconds)


def time_buckets(dt: np.ndarray, num_buckets: int) -> np.ndarray:
    """The ranker's time-bias bucket of each time difference (seconds), as the graphs compute it (float32).

    The service keys its history K/V cache on the buckets of (query time - history times): the K/V depend
    on the query time through these only, so a later request whose buckets are the same reuses them.
    """
    dt = np.maximum(np.abs(dt), 1).astype(np.float32)
    return np.clip(np.floor(np.log(dt) / np.float32(LOG_BUCKET)), 0, num_buckets).astype(np.int64)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]  # batch first; -1 = dynamic

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)


def model_specs(d: ModelDims) -> dict[str, ModelSpec]:
    B, L, M = -1, -1, -1  # batch, history length, candidates: all dynamic
    E, T, NL = d.content_dim, d.tower_dim, d.num_layers
    f32, i64 = "float32", "int64"
    kv = (
        TensorSpec("hist_k", f32, (B, NL, L, d.k_width)),
        TensorSpec("hist_v", f32, (B, NL, L, d.v_width)),
        TensorSpec("hist_q", f32, (B, d.d_model)),  # next-item query of the whole history
    )
    # The user tower's per-block keys and values, heads side by side (its width is tower_dim).
    tower_kv = (B, d.tower_layers, L, T)
    specs = [
        ModelSpec(
            ITEM_TOWER,
            (TensorSpec("content_emb", f32, (B, E)), TensorSpec("item_idx", i64, (B, 1))),
            (
                TensorSpec("item_vec", f32, (B, T)),
                # the user tower's input token of the item (its history side): precomputed per item, USER_TOKENS_FILE
                TensorSpec("user_token", f32, (B, T)),
            ),
        ),
        ModelSpec(
            USER_TOWER,
            (TensorSpec("hist_token", f32, (B, L, T)), TensorSpec("hist_valid", f32, (B, L))),
            (
                TensorSpec("user_vec", f32, (B, T)),
                TensorSpec("user_k", f32, tower_kv),
                TensorSpec("user_v", f32, tower_kv),
            ),
        ),
        ModelSpec(
            USER_TOWER_EXTEND,
            (
                # past_*: user_k/user_v of the history's first P items, unpadded; new_*: the N items after them
                TensorSpec("past_k", f32, tower_kv),
                TensorSpec("past_v", f32, tower_kv),
                TensorSpec("new_token", f32, (B, L, T)),
            ),
            (
                TensorSpec("user_vec", f32, (B, T)),
                TensorSpec("new_k", f32, tower_kv),  # the N new positions' keys/values, to append to past_*
                TensorSpec("new_v", f32, tower_kv),
            ),
        ),
        ModelSpec(
            RANKER_HISTORY,
            (
                TensorSpec("hist_token", f32, (B, L, d.d_model)),  # ranker_item of each history item
                TensorSpec("hist_ts", i64, (B, L)),
                TensorSpec("hist_valid", f32, (B, L)),
                TensorSpec("query_ts", i64, (B, 1)),  # the newest position's time bias counts to it
            ),
            kv,
        ),
        ModelSpec(
            RANKER_CANDIDATES,
            (
                *kv,
                TensorSpec("hist_ts", i64, (B, L)),
                TensorSpec("hist_valid", f32, (B, L)),
                TensorSpec("query_ts", i64, (B, 1)),
                TensorSpec("cand_token", f32, (B, M, d.d_model)),  # ranker_item of each candidate
            ),
            (TensorSpec("scores", f32, (B, M)),),
        ),
        ModelSpec(
            RANKER_ITEM,
            (TensorSpec("content_emb", f32, (B, E)), TensorSpec("item_idx", i64, (B, 1))),
            (TensorSpec("item_token", f32, (B, d.d_model)),),
        ),
    ]
    return {s.name: s for s in specs}


@dataclass(frozen=True)
class Manifest:
    """What a built repository holds: which config and data it came from, and its dims."""

    config: str
    model_version: str
    dims: ModelDims
    embedding_model: str
    embedding_version: str  # keys in Redis carry it; changes when the content embeddings change
    num_candidates: int
    microbatch: int
    # Graphs whose weight matmuls are int8 (the build's int8 step, or `falconrec quantize`); the model_version stays
    # the fp32 build's: towers, index and history K/V are the same, only these graphs' scores differ (within the check).
    int8: list[str] = field(default_factory=list)

    def write(self, repo: Path) -> None:
        (repo / MANIFEST).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, repo: Path) -> Manifest:
        path = repo / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} missing: {repo} is not a built falconrec repository (run `falconrec build`)"
            )
        raw = json.loads(path.read_text())
        raw["dims"] = ModelDims(**raw["dims"])
        return cls(**raw)


def onnx_path(repo: Path, model: str) -> Path:
    return repo / model / MODEL_VERSION_DIR / ONNX_FILE


# Graphs a build may serve with int8 weight matmuls (`[serve] int8`, exporters/quantize.py).
QUANTIZABLE = (RANKER_CANDIDATES, RANKER_HISTORY, USER_TOWER, USER_TOWER_EXTEND)


def check_int8(models: Iterable[str]) -> tuple[str, ...]:
    """The graphs to quantize, checked: quantizable ones, the user tower and its extension together (the
    extension continues the full pass's K/V: both in one precision, or a returning user's vector would mix them)."""
    models = tuple(dict.fromkeys(models))
    unknown = set(models) - set(QUANTIZABLE)
    if unknown:
        raise ValueError(f"int8: unknown graphs {sorted(unknown)}; choose from {', '.join(QUANTIZABLE)}")
    if (USER_TOWER in models) != (USER_TOWER_EXTEND in models):
        raise ValueError(f"int8: {USER_TOWER} and {USER_TOWER_EXTEND} go together")
    return models


def fp32_onnx_path(repo: Path, model: str) -> Path:
    return repo / model / MODEL_VERSION_DIR / FP32_ONNX_FILE


def fp32_graph_path(repo: Path, model: str) -> Path:
    """The fp32 graph of `model`: the origin kept beside an int8 model.onnx, else model.onnx itself."""
    fp32 = fp32_onnx_path(repo, model)
    return fp32 if fp32.is_file() else onnx_path(repo, model)
