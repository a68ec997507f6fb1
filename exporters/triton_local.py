"""Start the real `tritonserver` binary bundled in the nvidia-pytriton wheel, on loopback ports.

It lives in its own virtual environment (.venv-triton, made by tests/setup_triton.sh) because the
wheel pins numpy < 2. The Python backend's stub must match that environment's Python, and the
server needs LD_LIBRARY_PATH to hold the Python shared library's directory and the wheel's libs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VENV = Path(".venv-triton")


def _free_port() -> int:
    # Not loadtest.procs.free_port (the shared one): exporters/ sits below loadtest/ and may not import it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_python_info(venv: Path) -> tuple[str, Path, Path]:
    out = subprocess.check_output(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sys, sysconfig, site; print(f'{sys.version_info[0]}.{sys.version_info[1]}');"
            "print(sysconfig.get_config_var('LIBDIR')); print(site.getsitepackages()[0])",
        ],
        text=True,
    ).split("\n")
    return out[0], Path(out[1]), Path(out[2])


def find_tritonserver(venv: Path = DEFAULT_VENV) -> Path | None:
    if not (venv / "bin" / "python").exists():
        return None
    _, _, site = _venv_python_info(venv)
    binary = site / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    return binary if binary.exists() else None


@dataclass
class TritonProcess:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        """SIGKILL the whole group (started with start_new_session=True): the Python-backend stubs are tritonserver's
        children and outlived it when only its pid was killed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


def start_tritonserver(
    model_repo: Path,
    venv: Path = DEFAULT_VENV,
    log_path: Path | None = None,
    timeout_s: float = 60.0,
    http_port: int | None = None,
    grpc_port: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> TritonProcess:
    """`extra_args`: more tritonserver flags, e.g. ("--model-control-mode=explicit", "--load-model=*")."""
    pyver, libdir, site = _venv_python_info(venv)
    root = site / "pytriton" / "tritonserver"
    stub = root / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    backend_stub = root / "backends" / "python" / "triton_python_backend_stub"
    if not backend_stub.exists():
        shutil.copy(stub, backend_stub)
        backend_stub.chmod(0o755)
    http, grpc_port, metrics = http_port or _free_port(), grpc_port or _free_port(), _free_port()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(
            [str(libdir), str(site / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH", "")]
        ),
        "PYTHONPATH": str(site),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    log_path = log_path or Path(model_repo).with_suffix(".log")
    log = open(log_path, "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={model_repo}",
            f"--http-port={http}",
            f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics}",
            f"--backend-directory={root / 'backends'}",
            "--allow-metrics=false",
            "--log-verbose=0",
            "--exit-on-error=true",
            "--strict-readiness=true",
            *extra_args,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    t = TritonProcess(proc, http, grpc_port, log_path)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return t
        except OSError:
            pass
        time.sleep(0.2)
    t.kill()
    raise RuntimeError(f"tritonserver not ready in {timeout_s}s: {log_path.read_text()[-3000:]}")
