"""A Python-backend twin of the real Triton repository, for a `tritonserver` without the ONNX Runtime
backend (the one bundled in the nvidia-pytriton wheel). Same model names, tensors and batching
settings (rendered from the same contract); each model's `model.py` runs the same `model.onnx` with
ONNX Runtime. Production serves the real repository with the `onnxruntime_onnx` platform."""

from __future__ import annotations

import shutil
from pathlib import Path

from exporters.triton_config import TritonOptions, render
from service.contract import MODEL_VERSION_DIR, ONNX_FILE, Manifest, model_specs, onnx_path

MODEL_PY = """\
import json
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            outs = self.sess.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, o) for n, o in zip(self.outputs, outs)]))
        return responses
"""


def write_twin(repo: Path, out: Path, opts: TritonOptions = TritonOptions(instance_kind="KIND_CPU")) -> Path:
    manifest = Manifest.read(repo)
    if out.exists():
        shutil.rmtree(out)
    for name, spec in model_specs(manifest.dims).items():
        d = out / name / MODEL_VERSION_DIR
        d.mkdir(parents=True)
        shutil.copy(onnx_path(repo, name), d / ONNX_FILE)
        (d / "model.py").write_text(MODEL_PY)
        (out / name / "config.pbtxt").write_text(render(spec, opts, backend="python"))
    return out
