"""Publish a model version into a shared Triton repository (issue 25): each falconrec version `v<n>` becomes Triton
version `<n>` of every model (`<triton_repo>/<model>/<n>/model.onnx`), with `version_policy: all`, so Triton serves
the versions side by side and each request names the one it runs on (service/backends/triton.py, with
FALCONREC_TRITON_VERSIONED=true).

The model's config.pbtxt is written first (the build's own, so its accelerator and batching settings carry over, with
the version policy added), then the version directory, written under a hidden name and renamed into place: a Triton
polling the repository never loads half a file, nor a new version under the old single-version policy. Removing old
version directories (Triton then unloads them) is the operator's call: a rollback needs its version loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from exporters.triton_config import TritonOptions, render
from exporters.triton_twin import MODEL_PY
from service.contract import FP32_ONNX_FILE, ONNX_FILE, Manifest, fp32_onnx_path, model_specs, onnx_path

MARK = "falconrec_model_version"  # which build a version directory holds (Triton ignores other files)
POLICY = "version_policy: { all { } }"


def _config(repo: Path, name: str, spec, twin: bool, opts: TritonOptions) -> str:  # noqa: ANN001 - a ModelSpec
    built = repo / name / "config.pbtxt"
    if twin:  # the Python-backend twin's own config (local tests)
        text = render(spec, opts, backend="python")
    else:
        text = built.read_text() if built.is_file() else render(spec, opts)
    return text if POLICY in text else text.rstrip("\n") + "\n" + POLICY + "\n"


def _write_atomic(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def publish(
    repo: Path, triton_repo: Path, number: int, opts: TritonOptions = TritonOptions(), twin: bool = False
) -> None:
    """Copy one build's graphs (`repo`, a build's model_repository) into `triton_repo` as version `number`.
    `twin`: the Python-backend twin that runs the same ONNX files (exporters/triton_twin.py; local tests)."""
    manifest = Manifest.read(repo)
    for name, spec in model_specs(manifest.dims).items():
        model_dir = triton_repo / name
        final = model_dir / str(number)
        if final.is_dir():
            mark = final / MARK
            held = mark.read_text().strip() if mark.is_file() else "?"
            if held != manifest.model_version:  # a reused number (a versions directory started afresh)
                raise ValueError(f"{final} holds model {held}, not {manifest.model_version}: remove it, or publish "
                                 "into a fresh Triton repository")  # fmt: skip
            continue
        model_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(model_dir / "config.pbtxt", _config(repo, name, spec, twin, opts))
        for left in model_dir.glob(f".{number}.*"):  # an earlier publish that died midway
            shutil.rmtree(left, ignore_errors=True)
        tmp = model_dir / f".{number}.{os.getpid()}"
        tmp.mkdir()
        shutil.copy(onnx_path(repo, name), tmp / ONNX_FILE)
        if fp32_onnx_path(repo, name).is_file():  # an int8 graph's fp32 origin, which its config names (GPU)
            shutil.copy(fp32_onnx_path(repo, name), tmp / FP32_ONNX_FILE)
        if twin:
            (tmp / "model.py").write_text(MODEL_PY)
        (tmp / MARK).write_text(manifest.model_version + "\n")
        tmp.rename(final)
