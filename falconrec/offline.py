"""The offline commands: build (or its steps), eval, cold-start. They import training and exporters (torch)
lazily, so a serving-only install (no `train` extra) still runs the online commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from falconrec.models import DEFAULT_VERSIONS, VersionsOpt, add_and_promote, add_build
from falconrec.options import ArtifactsOpt, ConfigOpt, RepoOpt, console, default_config, log_line
from service.artifacts import DEFAULT_ARTIFACTS, DEFAULT_REPOSITORY


def require_offline():
    try:
        from falconrec.build import Builder
        from training.config import load_config
    except ImportError as e:  # torch & co. live in the `train` extra
        console.print(f"[red]offline commands need the train extra ({e}); pip install -e '.[train]'[/red]")
        raise typer.Exit(2) from e
    return load_config, Builder


def builder(
    config: str,
    artifacts: Path,
    repo: Path,
    data_dir: Path | None = None,
    download: bool = False,
    force: bool = False,
    tensorrt: bool = False,
    interactions: Path | None = None,
    items: Path | None = None,
):
    load_config, Builder = require_offline()
    try:
        cfg = with_files(load_config(config), interactions, items)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from e
    return Builder(
        cfg,
        artifacts,
        repo,
        data_dir=data_dir,
        download=download,
        force=force,
        # markup off: log lines hold "[data]"-style step names and the load report's values as read from the files
        log=log_line,
        tensorrt=tensorrt,
    )


def with_files(cfg, interactions: Path | None, items: Path | None):
    """The config with `[data] source = "files"` and these two paths (a one-off: `build --interactions --items`);
    the rest of [data] (column names, template, filters) stays the config's."""
    if interactions is None and items is None:
        return cfg
    if interactions is None or items is None:
        raise ValueError("--interactions and --items go together: the interactions table and the items table")
    from dataclasses import replace

    return replace(cfg, data=replace(cfg.data, source="files", interactions=str(interactions), items=str(items)))


def print_summary(results) -> None:
    from falconrec.build import summary_rows

    t = Table(title="falconrec build")
    for col in ("step", "status", "time", "size", "result"):
        t.add_column(col)
    for row in summary_rows(results):
        t.add_row(*row)
    Console().print(t)


def run_steps(b, until: str, only: set[str] | None = None) -> None:
    from training.data import DatasetError

    order = ["data", "embed", "train", "export", "index"]
    try:
        ds = b.data()
        if order.index(until) >= 1:
            emb, meta = b.embed(ds)
        if order.index(until) >= 2:
            b.train(ds, emb, only)
        if order.index(until) >= 3:
            manifest = b.export(ds, emb, meta)
        if order.index(until) >= 4:
            b.index(ds, emb, manifest)
            b.quantize()  # the config's int8 graphs, behind their check (it scores the cascade: after the index)
    except DatasetError as e:
        # plain text: the load report quotes values from the user's files, which may look like markup
        console.print(str(e), style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from e
    print_summary(b.results)


def build(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    data_dir: Annotated[Path | None, typer.Option(help="MovieLens-1M directory (default: FALCONREC_DATA_DIR)")] = None,
    download: Annotated[bool, typer.Option(help="download ml-1m.zip (SHA-256 checked) if missing")] = False,
    force: Annotated[bool, typer.Option(help="re-run every step")] = False,
    tensorrt: Annotated[bool, typer.Option(help="add the TensorRT FP16 accelerator to config.pbtxt")] = False,
    interactions: Annotated[
        Path | None, typer.Option(help='interactions file or directory: [data] source = "files" (docs/data.md)')
    ] = None,
    items: Annotated[Path | None, typer.Option(help="items file or directory, with --interactions")] = None,
    add_version: Annotated[
        bool, typer.Option("--add-version", help="then add the build to --versions as a new model version")
    ] = False,
    promote: Annotated[
        bool, typer.Option("--promote", help="then add it as a version and promote it through the gate")
    ] = False,
    versions: VersionsOpt = DEFAULT_VERSIONS,
) -> None:
    """Data -> LLM embeddings -> train towers, HSTU, SASRec -> ONNX + config.pbtxt -> FAISS index; with
    --add-version / --promote also a model version the service can swap to (`falconrec models`)."""
    run_steps(builder(config, artifacts, repo, data_dir, download, force, tensorrt, interactions, items), "index")
    if add_version or promote:
        # A version is named by its config: a one-off --interactions/--items build is still `config`'s data
        # source only by name, so the note says where its data came from.
        note = f"build of {interactions} + {items}" if interactions else "falconrec build"
        if promote:
            add_and_promote(config, artifacts, repo, versions, note, force=False)
        else:
            add_build(config, artifacts, repo, versions, note)


def embed(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    data_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Item text -> frozen text model -> mean-pooled content embeddings (float16, cached by text hash)."""
    run_steps(builder(config, artifacts, DEFAULT_REPOSITORY, data_dir), "embed")


def train(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    data_dir: Annotated[Path | None, typer.Option()] = None,
    models: Annotated[str, typer.Option(help="comma list of towers, ranker, sasrec")] = "towers,ranker,sasrec",
) -> None:
    """Train the LEARN towers, the HSTU ranker and the SASRec baseline (after data and embed)."""
    only = {m.strip() for m in models.split(",") if m.strip()}
    unknown = only - {"towers", "ranker", "sasrec"}
    if unknown:
        console.print(f"[red]unknown models {sorted(unknown)}: choose from towers, ranker, sasrec[/red]")
        raise typer.Exit(2)
    run_steps(builder(config, artifacts, DEFAULT_REPOSITORY, data_dir), "train", only)


def export(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    tensorrt: Annotated[bool, typer.Option()] = False,
) -> None:
    """Write the Triton model repository (ONNX + config.pbtxt) and the FAISS index (no training)."""
    run_steps(builder(config, artifacts, repo, tensorrt=tensorrt), "index", only=set())


def eval_(
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    max_users: Annotated[int | None, typer.Option(help="evaluate the first N users only")] = None,
) -> None:
    """HR@10/NDCG@10/HR@50/HR@200 on the paper's protocol and the unfiltered one: popularity, SASRec, HSTU, cascade."""
    require_offline()
    from training.evaluate import evaluate

    out = evaluate(config, artifacts, repo, max_users, log=log_line)
    for proto, rows in out["results"].items():
        t = Table(
            title=f"{out['dataset']} leave-one-out test, {out['users']} users, {out['items']} items — "
            f"protocol '{proto}': {out['protocols'][proto]}"
        )
        for col in ("model", "HR@10", "NDCG@10", "HR@50", "HR@200"):
            t.add_column(col)
        # The paper's rows are on its own protocol: shown beside ours on that one only.
        shown = {**rows, **out["paper"]} if proto == "paper" else rows
        for name, m in shown.items():
            t.add_row(name, *(f"{m[k]:.4f}" if k in m else "-" for k in ("hr@10", "ndcg@10", "hr@50", "hr@200")))
        Console().print(t)
    console.print(f"wrote {artifacts / 'eval.json'}")


def quantize(
    out: Annotated[Path, typer.Option(help="where the int8 copy of --repo is written (replaced if present)")],
    config: ConfigOpt = default_config(),
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    repo: RepoOpt = DEFAULT_REPOSITORY,
    models: Annotated[str, typer.Option(help="comma-separated graphs to quantize")] = "ranker_candidates",
    overlap_users: Annotated[int, typer.Option(help="users whose top 10 are compared")] = 1000,
) -> None:
    """A copy of the repository with int8 weight matmuls (CPU), checked against fp32 on the served cascade by the
    build's rule (exporters/quantize.py; exit 1 when it fails). Serve it with --repo OUT."""
    require_offline()
    import shutil

    from exporters.quantize import fp32_copy, quality_check, rule, write_quantized_repository, write_report
    from service.contract import QUANTIZATION_REPORT, Manifest, check_int8

    try:
        names = check_int8(m.strip() for m in models.split(",") if m.strip())
        manifest = write_quantized_repository(repo, out, names)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    console.print(f"wrote {out} (int8: {', '.join(manifest.int8)}); scoring it and fp32 on the test split ...")
    reference = repo
    if Manifest.read(repo).int8:  # a build that kept int8 graphs: compare with the fp32 ones beside them
        reference = out.parent / f".{out.name}.fp32"
        fp32_copy(repo, reference)
    try:
        check = quality_check(config, artifacts, reference, out, overlap_users)
    finally:
        if reference != repo:
            shutil.rmtree(reference, ignore_errors=True)
    write_report(out, check, names)
    t = Table(title=f"int8 ({', '.join(names)}) vs fp32: served cascade, paper protocol, {check.users} users")
    for col in ("", "HR@10", "NDCG@10"):
        t.add_column(col)
    t.add_row("fp32", f"{check.hr10_fp32:.4f}", f"{check.ndcg10_fp32:.4f}")
    t.add_row("int8", f"{check.hr10_int8:.4f}", f"{check.ndcg10_int8:.4f}")
    Console().print(t)
    verdict = "[green]passed[/green]" if check.passed else "[red]failed[/red]"
    console.print(
        f"top-10 overlap over {check.overlap_users} users: {check.top10_overlap:.4f}; quality check {verdict} "
        f"({rule()}; report: {out / QUANTIZATION_REPORT})"
    )
    if not check.passed:
        raise typer.Exit(1)


def cold_start(
    config: ConfigOpt = "ml1m-cold",
    artifacts: ArtifactsOpt = DEFAULT_ARTIFACTS,
    data_dir: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Hold a fraction of items out of training; cascade HR@10/NDCG@10 on them, content+ID vs ID-only."""
    b = builder(config, artifacts, DEFAULT_REPOSITORY, data_dir)
    from training.coldstart import run
    from training.data import DatasetError

    try:
        ds = b.data()
        emb, _ = b.embed(ds)
    except DatasetError as e:
        console.print(str(e), style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from e
    out = run(b.cfg, ds, emb, b.paths.root, log=log_line)
    t = Table(
        title=f"cold items: {out['held_out_items']} of {out['items']} held out of training; "
        f"{out['cold_test_events']} test events with a cold target (paper protocol; chance HR@10 "
        f"{out['chance_hr@10']:.4f})"
    )
    for col in ("model", "HR@10", "NDCG@10", "HR@50", "HR@200"):
        t.add_column(col)
    for name, m in out["results"].items():
        t.add_row(name, *(f"{m[k]:.4f}" for k in ("hr@10", "ndcg@10", "hr@50", "hr@200")))
    Console().print(t)
    console.print(f"wrote {b.paths.root / 'cold_start.json'}")
