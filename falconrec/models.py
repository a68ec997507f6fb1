"""`falconrec models`: the model versions a service follows (service/versions.py) — add, list, promote, rollback.

A build writes into any --artifacts/--repo pair; `models add` copies that build into the versions directory as a new,
immutable version with its validation metrics. `promote` makes a version current if the gate passes (its ranker's
validation HR@10 and NDCG@10 not worse than the current version's by more than --tolerance) or with --force; every
serving process swaps to it within FALCONREC_VERSION_POLL_S, without a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from falconrec.options import ArtifactsOpt, ConfigOpt, RepoOpt, console, default_config
from service.artifacts import DEFAULT_ARTIFACTS, DEFAULT_REPOSITORY, ArtifactPaths, config_name
from service.contract import MANIFEST, Manifest
from service.pipeline.item_tokens import token_paths
from service.pipeline.retrieval import INDEX_FILE
from service.versions import VersionError, VersionInfo, VersionStore, gate, triton_number

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
VersionsOpt = Annotated[
    Path, typer.Option("--versions", envvar="FALCONREC_VERSIONS_DIR", help="the versions directory")
]
DEFAULT_VERSIONS = Path("versions")


def _store(versions: Path) -> VersionStore:
    """The versions directory, with the current pointer in Redis when FALCONREC_REDIS_URL is set (as the service)."""
    return VersionStore(versions, os.environ.get("FALCONREC_REDIS_URL") or None)


def validation_metrics(paths: ArtifactPaths) -> dict[str, float]:
    """The ranker's validation HR@10 and NDCG@10 at its best epoch (training's own summary; never the test split)."""
    try:
        train = json.loads((paths.root / "ranker.json").read_text())["train"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return {}
    best = next((e for e in train.get("epochs", []) if e.get("epoch") == train.get("best_epoch")), {})
    return {k: float(best[k]) for k in ("hr@10", "ndcg@10") if k in best}


@app.command()
def add(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    versions: VersionsOpt = DEFAULT_VERSIONS,
    note: Annotated[str, typer.Option(help="a line to remember it by")] = "",
    triton_repo: Annotated[
        Path | None,
        typer.Option(
            envvar="FALCONREC_TRITON_REPOSITORY",
            help="also publish it into this Triton model repository as Triton version <n> of v<n>",
        ),
    ] = None,
) -> str:
    """Copy a build (--artifacts, --repo) into the versions directory as a new version; prints its id."""
    return add_build(config, artifacts, repo, versions, note, triton_repo=triton_repo)


def add_build(
    config: str,
    artifacts: Path,
    repo: Path,
    versions: Path,
    note: str,
    holdout: dict | None = None,
    triton_repo: Path | None = None,
) -> str:
    """`models add`; a retrain passes its holdout comparison, which the gate reads (service/versions.py). With a
    Triton repository (--triton-repo, else FALCONREC_TRITON_REPOSITORY) the version is published there too."""
    src = ArtifactPaths.for_config(config, artifacts)
    # The token tables too: a build older than them is not servable (its graphs take content embeddings).
    needed = [repo / MANIFEST, src.index_dir / INDEX_FILE, *token_paths(src.index_dir)]
    if not all(p.is_file() for p in needed):
        raise typer.BadParameter(f"no complete build of {config!r} in {artifacts} and {repo} (`falconrec build`)")
    manifest = Manifest.read(repo)
    if manifest.config != config_name(config):
        raise typer.BadParameter(f"{repo} holds a build of {manifest.config!r}, not {config!r}")
    vs = VersionStore(versions)
    vid = vs.next_id()
    dest = vs.dir(vid)
    skip = shutil.ignore_patterns("trt_cache", ".*")  # engines are rebuilt per machine
    shutil.copytree(src.root, vs.artifacts(vid) / src.root.name, ignore=skip)
    shutil.copytree(repo, vs.repository(vid), ignore=skip)
    info = VersionInfo(
        vid, manifest.config, manifest.model_version, manifest.embedding_version, time.time(),
        validation_metrics(src), note, holdout or {},
    )  # fmt: skip
    triton_repo = triton_repo or (
        Path(os.environ["FALCONREC_TRITON_REPOSITORY"]) if os.environ.get("FALCONREC_TRITON_REPOSITORY") else None
    )
    if triton_repo is not None:  # before the info: a version Triton cannot serve is never listed
        from exporters.triton_versions import publish

        try:
            publish(repo, triton_repo, triton_number(vid))
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        console.print(f"published as Triton version {triton_number(vid)} in {triton_repo}")
    vs.write_info(info)  # last: a version without it is incomplete and never listed
    console.print(f"added version {vid} (model {manifest.model_version}) in {dest}: {info.metrics}")
    print(vid)
    return vid


@app.command("list")
def list_(versions: VersionsOpt = DEFAULT_VERSIONS) -> None:
    """Every version, oldest first, the current one marked."""
    vs = _store(versions)
    cur = vs.current()
    t = Table(title=f"model versions in {vs.root}")
    for col in ("", "id", "config", "model", "valid HR@10", "valid NDCG@10", "added", "note"):
        t.add_column(col)
    for vid in vs.ids():
        i = vs.info(vid)
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created))
        hr, ndcg = (f"{i.metrics[k]:.4f}" if k in i.metrics else "-" for k in ("hr@10", "ndcg@10"))
        t.add_row("*" if vid == cur else "", vid, i.config, i.model_version, hr, ndcg, added, i.note)
    Console().print(t)


@app.command()
def current(versions: VersionsOpt = DEFAULT_VERSIONS) -> None:
    """Print the current version's id (the Redis key when FALCONREC_REDIS_URL is set); exit 1 when there is none."""
    vid = _store(versions).current()
    if vid is None:
        raise typer.Exit(1)
    print(vid)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="the version id, e.g. v3")],
    force: Annotated[bool, typer.Option(help="skip the validation gate")] = False,
    tolerance: Annotated[float, typer.Option(help="how much worse a validation metric may be")] = 0.005,
    versions: VersionsOpt = DEFAULT_VERSIONS,
) -> None:
    """Make a version current if it passes the gate; exits 1 (and keeps it, unserved) when it does not."""
    vs = _store(versions)
    try:
        cand = vs.info(version)
        cur = vs.current()
        why = None if force else gate(cand, vs.info(cur) if cur else None, tolerance)
        if why:
            console.print(f"[red]version {version} not promoted: {why} (--force to promote anyway)[/red]")
            raise typer.Exit(1)
        before = vs.set_current(version)
    except VersionError as e:
        raise typer.BadParameter(str(e)) from None
    console.print(f"current version: {version} (was {before}){' [forced]' if force else ''}")


def add_and_promote(
    config: str,
    artifacts: Path,
    repo: Path,
    versions: Path,
    note: str,
    force: bool,
    tolerance: float = 0.005,
    holdout: dict | None = None,
) -> None:
    """Add a build as a new version, then promote it: through the gate, or --force; a refusal keeps it listed."""
    newest = add_build(config, artifacts, repo, versions, note, holdout)
    try:
        promote(newest, force=force, tolerance=tolerance, versions=versions)
    except typer.Exit as e:
        if e.exit_code:  # the gate said no: the version stays listed, unserved
            console.print(f"{newest} kept but not served (see above)")
        raise


@app.command()
def rollback(versions: VersionsOpt = DEFAULT_VERSIONS) -> None:
    """Back to the version that was current before this one."""
    vs = _store(versions)
    try:
        console.print(f"current version: {vs.rollback()}")
    except VersionError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(1) from None
