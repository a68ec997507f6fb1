"""torch -> ONNX for the served graphs, with names, dtypes and dynamic axes from service.contract."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from service.contract import (
    ITEM_TOWER,
    RANKER_CANDIDATES,
    RANKER_HISTORY,
    RANKER_ITEM,
    USER_TOWER,
    USER_TOWER_EXTEND,
    ModelDims,
    ModelSpec,
    model_specs,
    onnx_path,
)
from training.models import HSTURanker, TwoTower

OPSET = 18
# Part of the export step's cache key: bump it when the graphs change for the same weights, so `falconrec
# build` re-exports instead of keeping a repository written by older code.
GRAPH_REVISION = 12


class ItemTowerGraph(nn.Module):
    def __init__(self, towers: TwoTower):
        super().__init__()
        self.m = towers

    def forward(self, content_emb: torch.Tensor, item_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = item_idx[:, 0]
        return self.m.item_vec(content_emb, idx), self.m.user_token(content_emb, idx)


class UserTowerGraph(nn.Module):
    def __init__(self, towers: TwoTower):
        super().__init__()
        self.m = towers

    def forward(self, hist_token, hist_valid):
        return self.m.user_state(hist_token, hist_valid)


class UserTowerExtendGraph(nn.Module):
    def __init__(self, towers: TwoTower):
        super().__init__()
        self.m = towers

    def forward(self, past_k, past_v, new_token):
        return self.m.user_extend(new_token, past_k, past_v)


class RankerHistoryGraph(nn.Module):
    def __init__(self, ranker: HSTURanker):
        super().__init__()
        self.m = ranker

    def forward(self, hist_token, hist_ts, hist_valid, query_ts):
        hidden, k, v = self.m.history(None, None, hist_ts, hist_valid, query_ts, serving=True, hist_token=hist_token)
        return k, v, self.m.next_item_query(hidden[:, -1])


class RankerCandidatesGraph(nn.Module):
    """Every candidate sits at the serving position L (after the whole history), at the query time."""

    def __init__(self, ranker: HSTURanker, as_trained: bool = False):
        super().__init__()
        self.m = ranker
        self.as_trained = as_trained  # the trained candidates() path: the export's parity reference

    def forward(self, hist_k, hist_v, hist_q, hist_ts, hist_valid, query_ts, cand_token):
        hist_q = hist_q.unsqueeze(1)
        if self.as_trained:
            pos = torch.ones_like(query_ts) * hist_ts.shape[1]
            return self.m.candidates(hist_k, hist_v, hist_q, hist_ts, hist_valid, None, None, pos, query_ts, cand_token)
        # Position and time are shared by all candidates (bias computed once per user), and the attention weights
        # take one pass instead of five (candidates_at_end).
        return self.m.candidates_at_end(hist_k, hist_v, hist_q, hist_ts, hist_valid, query_ts, cand_token)


class RankerItemGraph(nn.Module):
    """A candidate's input token from its content and ID: run per item at export and for items added live."""

    def __init__(self, ranker: HSTURanker):
        super().__init__()
        self.m = ranker

    def forward(self, content_emb: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return self.m.item_token(content_emb, item_idx[:, 0])


def example_inputs(
    spec: ModelSpec, dims: ModelDims, batch: int = 2, hist: int = 7, cands: int = 5, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs of the right names/dtypes; dynamic dims take distinct sizes so export can't fold them."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = list(t.shape)
        shape[0] = batch
        if t.name.startswith("hist_") and t.name != "hist_q":
            shape[2 if t.name in ("hist_k", "hist_v") else 1] = hist
        if t.name in ("past_k", "past_v"):
            shape[2] = hist
        if t.name.startswith(("cand_", "new_")):
            shape[1] = cands
        if t.name == "item_idx":
            out[t.name] = rng.integers(0, dims.num_items + 1, size=shape).astype(np.int64)
        elif t.name == "hist_ts":
            out[t.name] = np.sort(rng.integers(10**9, 10**9 + 10**7, size=shape), axis=-1).astype(np.int64)
        elif t.name == "query_ts":
            out[t.name] = np.full(shape, 10**9 + 2 * 10**7, dtype=np.int64)
        elif t.name == "hist_valid":
            v = np.ones(shape, np.float32)
            v[0, :2] = 0.0  # left padding in the first row
            out[t.name] = v
        else:
            out[t.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _dynamic_shapes(spec: ModelSpec) -> dict[str, dict[int, object]]:
    Dim = torch.export.Dim
    batch, hist, cand = Dim("batch", min=1, max=65536), Dim("hist", min=2, max=4096), Dim("cand", min=1, max=65536)
    new = Dim("new", min=1, max=4096)
    names = {"batch": batch, "hist": hist, "cand": cand, "new": new}
    dyn: dict[str, dict[int, object]] = {}
    for t in spec.inputs:
        axes = {0: names["batch"]}
        if t.name in ("hist_k", "hist_v", "past_k", "past_v"):
            axes[2] = names["hist"]
        elif t.name.startswith("new_"):
            axes[1] = names["new"]
        elif t.name.startswith("hist_") and t.name != "hist_q":
            axes[1] = names["hist"]
        elif t.name.startswith("cand_"):
            axes[1] = names["cand"]
        dyn[t.name] = axes
    return dyn


def export_graph(module: nn.Module, spec: ModelSpec, dims: ModelDims, path: Path) -> Path:
    module = module.eval()
    ex = example_inputs(spec, dims)
    args = tuple(torch.from_numpy(ex[t.name]) for t in spec.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module,
            args,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_dynamic_shapes(spec),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    prog.optimize()
    prog.save(str(path), external_data=False)
    check_onnx_against_spec(path, spec)
    return path


def check_onnx_against_spec(path: Path, spec: ModelSpec) -> None:
    """Fail at export, not at request time, when a graph's I/O differs from the contract."""
    m = onnx.load(str(path), load_external_data=False)
    got = {
        "inputs": [
            (
                i.name,
                onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name,
                len(i.type.tensor_type.shape.dim),
            )
            for i in m.graph.input
        ],
        "outputs": [
            (
                o.name,
                onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name,
                len(o.type.tensor_type.shape.dim),
            )
            for o in m.graph.output
        ],
    }
    want = {
        "inputs": [(t.name, t.dtype, len(t.shape)) for t in spec.inputs],
        "outputs": [(t.name, t.dtype, len(t.shape)) for t in spec.outputs],
    }
    if got != want:
        raise RuntimeError(f"{path}: graph I/O {got} does not match the contract for {spec.name}: {want}")


def served_graphs(towers: TwoTower, ranker: HSTURanker, as_trained: bool = False) -> dict[str, nn.Module]:
    """The exported wrappers, by model name; as_trained: the forms training used (export's parity reference)."""
    return {
        ITEM_TOWER: ItemTowerGraph(towers),
        USER_TOWER: UserTowerGraph(towers),
        USER_TOWER_EXTEND: UserTowerExtendGraph(towers),
        RANKER_HISTORY: RankerHistoryGraph(ranker),
        RANKER_CANDIDATES: RankerCandidatesGraph(ranker, as_trained),
        RANKER_ITEM: RankerItemGraph(ranker),
    }


def _for_serving(towers: TwoTower, ranker: HSTURanker) -> tuple[TwoTower, HSTURanker]:
    """Copies with the content standardisation folded into the input projections (the trained ones untouched)."""
    towers, ranker = copy.deepcopy(towers).eval(), copy.deepcopy(ranker).eval()
    for emb in (towers.item_in, towers.user_in, ranker.items):
        emb.fold_standardisation()
    return towers, ranker


def check_parity(reference: nn.Module, path: Path, spec: ModelSpec, dims: ModelDims, tol: float = 1e-4) -> float:
    """The exported graph against the trained torch module, at shapes other than the export example's.
    Fails the export (not a request) when they disagree. Returns the worst relative error."""
    import onnxruntime as ort

    ex = example_inputs(spec, dims, batch=3, hist=11, cands=9, seed=1)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, ex)
    with torch.no_grad():
        want = reference.eval()(*(torch.from_numpy(ex[t.name]) for t in spec.inputs))
    want = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for t, g, w in zip(spec.outputs, got, want, strict=True):
        w = w.numpy()
        err = float(np.max(np.abs(g - w) / (np.abs(w) + 1.0)))
        if not err <= tol:
            raise RuntimeError(f"{path}: output {t.name} differs from torch by {err:.2e} (> {tol:.0e})")
        worst = max(worst, err)
    return worst


def export_all(towers: TwoTower, ranker: HSTURanker, dims: ModelDims, repo: Path) -> dict[str, Path]:
    specs = model_specs(dims)
    reference = served_graphs(towers.eval(), ranker.eval(), as_trained=True)
    served = served_graphs(*_for_serving(towers, ranker))
    out = {}
    for name, graph in served.items():
        out[name] = export_graph(graph, specs[name], dims, onnx_path(repo, name))
        check_parity(reference[name], out[name], specs[name], dims)
    return out
