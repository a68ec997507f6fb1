"""On the GPU machine: keep the parts received so far, and once all are there, install and unpack (issue 28).

    python3 loadtest/gpu/unpack.py receive .gpu/parts/p2     # copy one call's part into /tmp/ortgpu
    python3 loadtest/gpu/unpack.py install                   # all parts there: check, join, install, unpack

Standard library only: it runs before anything is installed. `install` checks every part's SHA-256, joins
them, installs the wheels with `pip install --no-deps --target /tmp/ortgpu/site`, puts the CUDA provider library
back into the installed onnxruntime package and unpacks the artifacts into the working tree. It prints what is
missing instead of failing half-way.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

STORE = Path(os.environ.get("FALCONREC_GPU_STORE", "/tmp/ortgpu"))  # /tmp survives between calls there


def receive(folder: Path) -> None:
    STORE.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copy(f, STORE / f.name)
    print("have:", " ".join(sorted(p.name for p in STORE.glob("part.*"))), flush=True)


def joined() -> tuple[dict, bytes]:
    if not (STORE / "parts.json").is_file():
        raise SystemExit("parts.json missing: it travels with the last part; send that one")
    index = json.loads((STORE / "parts.json").read_text())
    chunks = []
    for p in index["parts"]:
        path = STORE / p["name"]
        if not path.is_file():
            raise SystemExit(f"missing {p['name']}: send it first (receive)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != p["sha256"]:
            raise SystemExit(f"{p['name']} is corrupt (SHA-256 differs): send it again")
        chunks.append(data)
    return index, b"".join(chunks)


def install(site: Path = STORE / "site", tree: Path = Path("."), pip_args: list[str] | None = None) -> None:
    index, stream = joined()
    blobs = {b["name"]: stream[b["offset"] : b["offset"] + b["bytes"]] for b in index["blobs"]}
    work = STORE / "unpacked"
    shutil.rmtree(work, ignore_errors=True)
    with tarfile.open(fileobj=lzma.LZMAFile(io.BytesIO(blobs["payload.tar.xz"]))) as tar:
        tar.extractall(work, filter="data")
    wheels = sorted(str(p) for p in (work / "wheels").glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*cmd, *(pip_args or []), "--target", str(site), *wheels], check=True)
    provider = site / index["provider_path"]
    provider.write_bytes(lzma.decompress(blobs["provider.so.xz"]))
    for f in (work / "tree").rglob("*"):
        if f.is_file():
            dest = tree / f.relative_to(work / "tree")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    print(f"installed {len(wheels)} wheels into {site}; provider {provider.stat().st_size / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    verb = sys.argv[1] if len(sys.argv) > 1 else ""
    if verb == "receive":
        receive(Path(sys.argv[2]))
    elif verb == "install":
        extra = sys.argv[2:]  # e.g. the dry run's --python-version/--platform flags
        install(pip_args=extra)
    else:
        raise SystemExit(__doc__)
