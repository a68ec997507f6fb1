"""Pack what the GPU machine needs into parts that each fit one device call (issue 28).

The GPU machine has no package registry and takes at most 64 MiB of files per command, so everything travels in
parts under `.gpu/` (git-ignored), one carried folder per call (`.gpu/p1`, `.gpu/p2`, ...):

- onnxruntime-gpu's CUDA provider library (284 MB) compressed with xz on its own (~187 MB);
- the rest of that wheel and the service's own wheels (FastAPI, pydantic, uvicorn, FAISS, ...: what `service/`
  imports and the machine's image lacks), rewritten uncompressed so that xz compresses their libraries too;
- the built artifacts the service serves (data, content embeddings, FAISS index, ranker tokens, ONNX graphs).

    python -m loadtest.gpu.pack [--config ml1m-1epoch] [--part-mib 60]

On the machine, `loadtest/gpu/unpack.py` joins the parts, checks their SHA-256, installs the wheels with
`pip install --no-deps --target` and puts the provider library back into the installed package.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

from service.artifacts import ArtifactPaths
from service.contract import FP32_ONNX_FILE, MANIFEST, MODEL_NAMES, MODEL_VERSION_DIR, ONNX_FILE

ORT_GPU = "onnxruntime-gpu==1.31.1"  # CUDA 13 build: loads against the machine's own nvidia-*-cu13 libraries
PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
# What service/ imports; their dependencies are added from this environment's metadata, at the versions it runs.
SERVICE_ROOTS = (
    "fastapi",
    "uvicorn",
    "httptools",
    "pydantic-settings",
    "faiss-cpu",
    "redis",
    "orjson",
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "prometheus_client",
)
MACHINE_HAS = {"numpy"}  # the GPU image's own (2.5): FAISS and ONNX Runtime take it
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
GPU_DIR = Path(".gpu")


def download(specs: list[str], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    plats = [x for p in PLATFORMS for x in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version"]
    subprocess.run([*cmd, "3.12", "--implementation", "cp", *plats, "-d", str(dest), *specs], check=True)
    return sorted(dest.glob("*.whl"))


def closure(roots: tuple[str, ...]) -> list[str]:
    """name==version of the roots and everything they require (no extras), as installed here."""
    from packaging.requirements import Requirement

    pinned: dict[str, str] = {}
    todo = list(roots)
    while todo:
        dist = metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower().replace("_", "-")
        if name in pinned or name in MACHINE_HAS:
            continue
        pinned[name] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return [f"{n}=={v}" for n, v in sorted(pinned.items())]


def stored_copy(wheel: Path, drop: str | None = None) -> tuple[bytes, bytes | None]:
    """The wheel rewritten without compression (xz does better on the raw libraries), minus `drop`."""
    buf, dropped = io.BytesIO(), None
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if info.filename == drop:
                dropped = src.read(info)
                continue
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_STORED)
    return buf.getvalue(), dropped


def xz(data: bytes) -> bytes:
    return subprocess.run(["xz", "-6", "-T0", "-c"], input=data, capture_output=True, check=True).stdout


def artifact_files(config: str, artifacts: Path, repo: Path) -> list[tuple[Path, str]]:
    paths = ArtifactPaths.for_config(config, artifacts)
    files = [(paths.data, None), (paths.content_emb, None), (paths.content_emb.with_suffix(".json"), None)]
    files += [(p, None) for p in sorted(paths.index_dir.iterdir())]
    files += [(repo / MANIFEST, None)]
    files += [(repo / m / MODEL_VERSION_DIR / f, None) for m in MODEL_NAMES for f in (ONNX_FILE, FP32_ONNX_FILE)]
    files += [(p, None) for p in sorted(repo.glob("*/config.pbtxt"))]
    return [(p, str(p)) for p, _ in files if p.is_file()]


def payload(config: str, artifacts: Path, repo: Path, dl: Path) -> tuple[bytes, bytes]:
    """(the provider library, xz'd) and (a tar.xz of the stored wheels and the artifacts)."""
    ort_wheel = download([ORT_GPU], dl / "ort")[0]
    wheels = download(closure(SERVICE_ROOTS), dl / "service")
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w") as tar:
        rest, provider = stored_copy(ort_wheel, PROVIDER)
        assert provider is not None, f"{PROVIDER} not in {ort_wheel.name}"
        _add(tar, f"wheels/{ort_wheel.name}", rest)
        for w in wheels:
            _add(tar, f"wheels/{w.name}", stored_copy(w)[0])
        for path, arc in artifact_files(config, artifacts, repo):
            tar.add(path, arcname=f"tree/{arc}")
    print(f"provider {len(provider) / 2**20:.0f} MiB, payload tar {tar_buf.tell() / 2**20:.0f} MiB; compressing")
    return xz(provider), xz(tar_buf.getvalue())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def split(blobs: dict[str, bytes], part_bytes: int, out: Path) -> list[dict]:
    """One stream (blobs back to back), cut into parts of part_bytes; out/pN/part.N each, and out/parts.json."""
    stream = b"".join(blobs.values())
    parts = []
    for n, a in enumerate(range(0, len(stream), part_bytes), start=1):
        chunk = stream[a : a + part_bytes]
        (out / f"p{n}").mkdir(parents=True)
        (out / f"p{n}" / f"part.{n}").write_bytes(chunk)
        parts.append({"name": f"part.{n}", "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    layout, at = [], 0
    for name, blob in blobs.items():
        layout.append({"name": name, "offset": at, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        at += len(blob)
    index = {"parts": parts, "blobs": layout, "provider_path": PROVIDER}
    # The index rides with the last part (every part's folder is one call's carry).
    (out / f"p{len(parts)}" / "parts.json").write_text(json.dumps(index, indent=2))
    return parts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="ml1m-1epoch")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--repo", type=Path, default=Path("model_repository"))
    p.add_argument("--part-mib", type=float, default=60.0, help="the tree that travels is at most 64 MiB in all")
    a = p.parse_args(argv)
    parts_dir = GPU_DIR / "parts"
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    provider, rest = payload(a.config, a.artifacts, a.repo, GPU_DIR / "dl")
    parts = split({"provider.so.xz": provider, "payload.tar.xz": rest}, int(a.part_mib * 2**20), parts_dir)
    total = sum(x["bytes"] for x in parts)
    print(
        f"{len(parts)} parts, {total / 2**20:.1f} MiB: "
        + ", ".join(f"p{i + 1} {x['bytes'] / 2**20:.1f}" for i, x in enumerate(parts))
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
