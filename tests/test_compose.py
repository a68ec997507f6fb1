"""docker-compose.yml validated offline (no Docker engine here): schema, cross-references, paths."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_spec_schema():
    exe = Path(sys.executable).with_name("check-jsonschema")
    r = subprocess.run(
        [str(exe), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose not installed")
def test_docker_compose_config_quiet():
    r = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_services_and_order(compose):
    s = compose["services"]
    assert {"redis", "triton", "loader", "api", "locust"} <= set(s)
    assert s["locust"]["profiles"] == ["loadtest"]
    for name, svc in s.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in s, f"{name} depends on unknown service {dep}"
            want = "service_completed_successfully" if dep == "loader" else "service_healthy"
            assert cond["condition"] == want, (name, dep)
            if want == "service_healthy":
                assert "healthcheck" in s[dep], f"{dep} needs a healthcheck for {name}"
    assert "--appendonly" in s["redis"]["command"]  # persistence on
    assert s["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    api_env = s["api"]["environment"]
    assert api_env["FALCONREC_BACKEND"] == "triton" and api_env["FALCONREC_TRITON_URL"].startswith("triton:")
    assert api_env["FALCONREC_REDIS_URL"].startswith("redis://redis:")


def test_mounts_and_builds_exist(compose):
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
            text = (ROOT / build["context"] / build["dockerfile"]).read_text()
            assert f" AS {build['target']}" in text, f"{name}: target {build['target']} not in Dockerfile"
        for v in svc.get("volumes") or []:
            src = v.split(":")[0]
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which is not in the repository"
            else:
                assert src in declared, f"{name} uses undeclared volume {src}"


def test_api_images_install_without_torch():
    for f in ("service/Dockerfile", "service/Dockerfile.gpu"):
        text = (ROOT / f).read_text()
        api = text.split("FROM base AS api")[1].split("FROM ")[0] if "AS api" in text else text
        assert "torch" not in api and "[train]" not in api, f
