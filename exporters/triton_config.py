"""Triton `config.pbtxt` for each served model, generated from service.contract (nothing restated)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.contract import TRITON_DTYPES, ModelDims, ModelSpec, TensorSpec, model_specs

PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int = 64
    max_queue_delay_us: int = 200  # small: the service's budget is 20 ms end to end
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"  # KIND_GPU in the GPU compose profile
    tensorrt: bool = False  # ORT's TensorRT execution accelerator, FP16
    trt_workspace_bytes: int = 1 << 30


def _tensor(t: TensorSpec) -> str:
    dims = ", ".join(str(d) for d in t.shape[1:])  # batch dim is implied by max_batch_size
    return f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n    dims: [ {dims} ]\n  }}'


def render(spec: ModelSpec, opts: TritonOptions = TritonOptions(), backend: str | None = None) -> str:
    """config.pbtxt text; `backend="python"` swaps the ONNX Runtime platform for the Python backend."""
    parts = [
        f'name: "{spec.name}"',
        f'backend: "{backend}"' if backend else f'platform: "{PLATFORM}"',
        f"max_batch_size: {opts.max_batch_size}",
        "input [\n" + ",\n".join(_tensor(t) for t in spec.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor(t) for t in spec.outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {opts.max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {opts.instance_count}\n    kind: {opts.instance_kind}\n  }}\n]",
    ]
    if opts.tensorrt:
        parts.append(
            "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator: [\n      {\n"
            '        name: "tensorrt"\n'
            '        parameters { key: "precision_mode" value: "FP16" }\n'
            f'        parameters {{ key: "max_workspace_size_bytes" value: "{opts.trt_workspace_bytes}" }}\n'
            '        parameters { key: "trt_engine_cache_enable" value: "1" }\n'
            "      }\n    ]\n  }\n}"
        )
    return "\n".join(parts) + "\n"


def parse(text: str):
    """Parse as Triton's ModelConfig protobuf (raises on anything Triton would reject syntactically)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def write_configs(repo: Path, dims: ModelDims, opts: TritonOptions = TritonOptions()) -> list[Path]:
    out = []
    for name, spec in model_specs(dims).items():
        path = repo / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(spec, opts))
        out.append(path)
    return out


def set_model_filename(repo: Path, model: str, filename: str | None) -> None:
    """Point Triton's ONNX Runtime backend at `filename` in the model's version directory (None: its default,
    model.onnx). Used for int8 repositories: Triton may place a KIND_AUTO instance on a GPU, where ONNX Runtime runs
    the int8 kernels on the CPU with copies both ways (onnxruntime#7745), so Triton serves their fp32 origin."""
    path = repo / model / "config.pbtxt"
    text = path.read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("default_model_filename:")]
    if filename is not None:
        lines.insert(1, f'default_model_filename: "{filename}"')
    if "\n".join(lines) + "\n" != text:
        path.write_text("\n".join(lines) + "\n")
