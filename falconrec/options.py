"""What every command shares: the console, the common options and the default config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def log_line(message: str) -> None:
    """A progress line as written: "[data]"-style step names and values read from files are not rich markup."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="build config: tiny, ml1m, ml1m-large or a .toml path")]
# The same environment variables the service's settings read: `serve` in a container configured by them (compose)
# must not fall back to the CLI's defaults.
ArtifactsOpt = Annotated[Path, typer.Option(envvar="FALCONREC_ARTIFACTS_DIR", help="where artifacts/<config>/ live")]
RepoOpt = Annotated[
    Path, typer.Option("--repo", envvar="FALCONREC_MODEL_REPOSITORY", help="Triton model repository to write/serve")
]


def default_config() -> str:
    return os.environ.get("FALCONREC_CONFIG", "ml1m")
