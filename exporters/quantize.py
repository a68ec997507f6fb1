"""int8 weights for the served graphs on CPU (issue 26's precision lever), and the check that decides whether to keep
them: the same cascade scored by the fp32 and the int8 repository, HR@10 and each user's top 10 side by side.

What gets quantized, and why only that (ONNX Runtime 1.32's profile of `ranker_candidates`, 1,000 candidates after
200 events, one thread, AMD EPYC with VNNI): the weight matmuls (each layer's u/v/q/k and output projections, the
candidate head) ran at ~72 GFLOP/s as fp32 Gemms (766 us) and as int8 MatMulIntegerToFloat with the activation
quantized once per layer input in ~425 us. The attention matmuls against the history's K/V (activations on both
sides) were slower in int8 (dynamic quantization of a [1000, 200] tensor per call) and stay fp32, as does
everything else, and so does a weight with one output column (the candidate head's last layer: gemms_as_matmuls).
Weights are quantized per output channel (half the score error of one scale per matrix, same speed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from exporters.triton_config import set_model_filename
from service.contract import (
    FP32_ONNX_FILE,
    MODEL_NAMES,
    QUANTIZATION_REPORT,
    RANKER_CANDIDATES,
    Manifest,
    check_int8,
    fp32_onnx_path,
    onnx_path,
)

QUANTIZE_REVISION = 2  # bumped when what quantize_graph writes changes: builds redo their int8 step
# The issue's acceptance rule for a precision change: HR@10 within this of fp32's, top-10 overlap at least this.
MAX_HR_DROP = 0.003
MIN_TOP10_OVERLAP = 0.98


def _constant_folded(src: Path, dst: Path) -> None:
    """ONNX Runtime's basic (standard-op) optimizations written out: the weight slices the exporter leaves as Slice
    nodes over one fused matrix become initializers, which the quantizer needs to see as constant weights."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3  # its notes on initializers the folding left unused
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def gemms_as_matmuls(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm with a constant weight as MatMul (+ Add of its bias): ONNX Runtime's dynamic quantizer
    turns MatMul into the int8 kernel and leaves Gemm in fp32. A weight with one output column stays a Gemm: as
    int8 a matrix-vector product still quantizes its whole input, and its bias Add over [N, 1] cost more than the
    product (the candidate head's last layer: 15 + 9 us for 1,000 candidates). Returns how many were rewritten."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, rewritten, made = [], 0, set()
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        scaled_bias = attrs.get("beta", 1.0) != 1.0 and len(n.input) > 2 and n.input[2] not in inits
        if n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0) or scaled_bias:
            nodes.append(n)
            continue
        trans, alpha = attrs.get("transB", 0), attrs.get("alpha", 1.0)
        if inits[n.input[1]].dims[0 if trans else 1] == 1:
            nodes.append(n)
            continue
        w_name = f"{n.input[1]}__kn{'t' if trans else ''}{alpha:g}"
        if w_name not in made:  # one rewritten weight per (weight, form), however many Gemms share it
            w = numpy_helper.to_array(inits[n.input[1]])
            w = (w.T if trans else w) * np.float32(alpha)
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), w_name))
            made.add(w_name)
        out = n.output[0]
        if len(n.input) > 2 and n.input[2]:
            mid = f"{out}__mm"
            nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mid], name=f"{n.name}__mm"))
            bias = n.input[2]
            if attrs.get("beta", 1.0) != 1.0:
                b = numpy_helper.to_array(inits[bias]) * np.float32(attrs["beta"])
                bias = f"{bias}__beta"
                g.initializer.append(numpy_helper.from_array(b.astype(np.float32), bias))
            nodes.append(helper.make_node("Add", [mid, bias], [out], name=f"{n.name}__bias"))
        else:
            nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [out], name=f"{n.name}__mm"))
        rewritten += 1
    del g.node[:]
    g.node.extend(nodes)
    return rewritten


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_graph(src: Path, dst: Path) -> int:
    """`src` with its constant-weight matmuls in int8 (dynamic activations, per-channel weights) written to `dst`.
    Returns the number of matmuls quantized."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        folded, plain = Path(tmp) / "folded.onnx", Path(tmp) / "plain.onnx"
        _constant_folded(src, folded)
        model = onnx.load(str(folded))
        gemms_as_matmuls(model)
        inits = {i.name for i in model.graph.initializer}
        weights = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        if not weights:  # an empty nodes_to_quantize would mean "every node" to the quantizer
            raise ValueError(f"{src}: no matmul with a constant weight to quantize")
        onnx.save(model, str(plain))
        with _quiet_root_logger():  # its advice to pre-process first is for conv nets' shape inference
            quantize_dynamic(
                str(plain),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                nodes_to_quantize=weights,
                op_types_to_quantize=["MatMul"],
                extra_options={"MatMulConstBOnly": True},
            )
    return len(weights)


@dataclass
class QualityCheck:
    users: int
    hr10_fp32: float
    hr10_int8: float
    ndcg10_fp32: float
    ndcg10_int8: float
    overlap_users: int
    top10_overlap: float  # mean |top10(fp32) & top10(int8)| / 10 over the first overlap_users users

    @property
    def passed(self) -> bool:
        return self.hr10_fp32 - self.hr10_int8 <= MAX_HR_DROP and self.top10_overlap >= MIN_TOP10_OVERLAP


def write_quantized_repository(repo: Path, out: Path, models: tuple[str, ...] = (RANKER_CANDIDATES,)) -> Manifest:
    """A copy of `repo` at `out` whose `models` are int8, made from their fp32 graphs, which stay beside them
    (FP32_ONNX_FILE, what Triton's config names: see set_model_filename); the manifest lists the int8 ones."""
    models = check_int8(models)
    if out.resolve() == repo.resolve() or repo.resolve() in out.resolve().parents:
        raise ValueError(f"{out} is {repo} or inside it: write the int8 copy elsewhere")
    fp32_copy(repo, out)
    for name in models:
        shutil.copy2(onnx_path(out, name), fp32_onnx_path(out, name))
        quantize_graph(fp32_onnx_path(out, name), onnx_path(out, name))
        set_model_filename(out, name, FP32_ONNX_FILE)
    quantized = replace(Manifest.read(out), int8=sorted(models))
    quantized.write(out)
    return quantized


def write_report(out: Path, check: QualityCheck, models: tuple[str, ...]) -> None:
    report = {**asdict(check), "passed": check.passed, "models": list(models), "rule": rule()}
    (out / QUANTIZATION_REPORT).write_text(json.dumps(report, indent=2))


def rule() -> str:
    return f"HR@10 within {MAX_HR_DROP} of fp32 and mean top-10 overlap >= {MIN_TOP10_OVERLAP}"


def quality_check(config: str, artifacts: Path, repo: Path, out: Path, overlap_users: int = 1000) -> QualityCheck:
    """The served cascade (towers -> FAISS -> ranker over the manifest's number of candidates, the paper's
    protocol: the user's history items left out) scored from `repo` (fp32) and from `out` (int8), all test users."""
    from service.artifacts import ArtifactPaths
    from training.data import Dataset
    from training.evaluate import cascade_ranks
    from training.metrics import rank_metrics

    paths = ArtifactPaths.for_config(config, artifacts)
    ds = Dataset.load(paths.data)
    users = [u for u in range(ds.num_users) if len(ds.seqs[u]) >= 3]
    n = min(Manifest.read(repo).num_candidates, ds.num_items)
    metrics, tops = [], []
    for r in (repo, out):
        top: list[np.ndarray] = []
        ranks = cascade_ranks(ds, users, r, paths.index_dir, n, exclude_history=True, tops=top)
        metrics.append(rank_metrics(ranks))
        tops.append(top)
    k = min(overlap_users, len(users))
    overlap = float(np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(tops[0][:k], tops[1][:k], strict=True)]))
    return QualityCheck(
        users=len(users),
        hr10_fp32=metrics[0]["hr@10"],
        hr10_int8=metrics[1]["hr@10"],
        ndcg10_fp32=metrics[0]["ndcg@10"],
        ndcg10_int8=metrics[1]["ndcg@10"],
        overlap_users=k,
        top10_overlap=overlap,
    )


def fp32_copy(repo: Path, out: Path) -> None:
    """A copy of `repo` at `out` (replaced if present) with every graph in fp32."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(repo, out)
    restore_fp32(out)


def restore_fp32(repo: Path) -> None:
    """Every graph of `repo` back to fp32: each fp32 file found beside a model.onnx replaces it (the files, not the
    manifest, say which graphs are int8: a swap cut short leaves them ahead of it). The manifest then lists none, and
    the old check's report goes. Raises when the manifest lists an int8 graph whose fp32 origin is gone."""
    manifest = Manifest.read(repo)
    restored = set()
    for model in MODEL_NAMES:
        if fp32_onnx_path(repo, model).is_file():
            fp32_onnx_path(repo, model).replace(onnx_path(repo, model))
            restored.add(model)
        if (repo / model / "config.pbtxt").is_file():
            set_model_filename(repo, model, None)
    lost = set(manifest.int8) - restored
    if lost:
        raise RuntimeError(f"{repo}: int8 graphs {sorted(lost)} without their fp32 origin: export again")
    if manifest.int8:
        replace(manifest, int8=[]).write(repo)
    (repo / QUANTIZATION_REPORT).unlink(missing_ok=True)


def apply_int8(config: str, artifacts: Path, repo: Path, models: tuple[str, ...]) -> QualityCheck | None:
    """`models` of the built repository in int8, in place, when the quality check passes; fp32 otherwise. The fp32
    graphs stay beside the int8 ones (FP32_ONNX_FILE). Returns the check (None: nothing to quantize)."""
    restore_fp32(repo)
    if not models:
        return None
    work = repo.parent / f".{repo.name}.int8"
    try:
        write_quantized_repository(repo, work, models)
        check = quality_check(config, artifacts, repo, work)
        if check.passed:
            # fp32 copies first, then each int8 graph by rename, the manifest last: a run cut short anywhere leaves
            # files that restore_fp32 turns back into the fp32 repository.
            for model in models:
                shutil.copy2(fp32_onnx_path(work, model), fp32_onnx_path(repo, model))
            for model in models:
                tmp = onnx_path(repo, model).with_name(".int8.onnx")
                shutil.copy2(onnx_path(work, model), tmp)
                os.replace(tmp, onnx_path(repo, model))
                set_model_filename(repo, model, FP32_ONNX_FILE)  # Triton may run it on a GPU: see there
            Manifest.read(work).write(repo)
        write_report(repo, check, models)
        return check
    finally:
        shutil.rmtree(work, ignore_errors=True)
