"""Publish a model version into a shared Triton repository (issue 25): each falconrec version `v<n>` becomes Triton
version `<n>` of every model (`<triton_repo>/<model>/<n>/model.onnx`), with `version_policy: all`, so Triton serves
the versions side by side and each request names the one it runs on (service/backends/triton.py).

A version directory is written under a hidden name and renamed into place, so a Triton polling the repository never
loads half a file; config.pbtxt is rewritten only when it changes. Removing old version directories (Triton then
unloads them) is the operator's call: a rollback needs its version loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from exporters.triton_config import TritonOptions, render
from exporters.triton_twin import MODEL_PY
from service.contract import ONNX_FILE, Manifest, model_specs, onnx_path
from service.versions import triton_number  # noqa: F401 - the numbering belongs to the versions

MARK = "falconrec_model_version"  # which build a version directory holds (Triton ignores other files)


def publish(
    repo: Path, triton_repo: Path, number: int, opts: TritonOptions = TritonOptions(), twin: bool = False
) -> None:
    """Copy one build's graphs (`repo`, a build's model_repository) into `triton_repo` as version `number`.
    `twin`: the Python-backend twin that runs the same ONNX files (exporters/triton_twin.py; local tests)."""
    manifest = Manifest.read(repo)
    opts = TritonOptions(**{**opts.__dict__, "all_versions": True})
    for name, spec in model_specs(manifest.dims).items():
        model_dir = triton_repo / name
        final = model_dir / str(number)
        if final.is_dir():
            mark = final / MARK
            held = mark.read_text().strip() if mark.is_file() else "?"
            if held != manifest.model_version:  # a reused number (a versions directory started afresh)
                raise ValueError(f"{final} holds model {held}, not {manifest.model_version}: remove it, or publish "
                                 "into a fresh Triton repository")  # fmt: skip
        else:
            tmp = model_dir / f".{number}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy(onnx_path(repo, name), tmp / ONNX_FILE)
            if twin:
                (tmp / "model.py").write_text(MODEL_PY)
            (tmp / MARK).write_text(manifest.model_version + "\n")
            tmp.rename(final)
        config = render(spec, opts, backend="python" if twin else None)
        path = model_dir / "config.pbtxt"
        if not path.is_file() or path.read_text() != config:
            tmp_cfg = model_dir / f".config.pbtxt.{os.getpid()}"
            tmp_cfg.write_text(config)
            tmp_cfg.replace(path)
