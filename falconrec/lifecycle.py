"""Serve in minutes, improve in the background (issue 25, point 4): the newcomer path of `bash service/run.sh`.

`falconrec models quick` builds a *quick* first version (the data, the content embeddings, a few epochs of the
towers and the ranker; no SASRec, which is an evaluation baseline and belongs to `falconrec eval`), adds it to the
versions directory and makes it current, so the service answers within minutes. `falconrec models full` then
runs the whole build (every epoch of the config) as its own process, adds the result as a version and promotes it
through the gate; the serving processes swap to it without a restart (service/swap.py).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Annotated

import typer

from falconrec.models import VersionsOpt, add_and_promote
from falconrec.options import ConfigOpt, console, default_config, log_line

DEFAULT_VERSIONS = Path("versions")
QUICK_EPOCHS = {"towers": 2, "ranker": 5}  # ~4-6 minutes of training for ml1m on two cores, embedding apart
WORK = Path("artifacts") / "builds"  # where the builds are made before `models add` copies them in


def quick_config(cfg, epochs: dict[str, int]):  # noqa: ANN001, ANN201 - training.config.BuildConfig, imported lazily
    """The config with a few epochs per model, the schedule's decay over those (counted in epochs, as always)."""
    return dataclasses.replace(
        cfg,
        towers=dataclasses.replace(cfg.towers, epochs=min(cfg.towers.epochs, epochs["towers"])),
        ranker=dataclasses.replace(cfg.ranker, epochs=min(cfg.ranker.epochs, epochs["ranker"])),
    )


def _build(cfg, artifacts: Path, repo: Path, data_dir: Path | None, models: set[str] | None) -> None:  # noqa: ANN001
    from falconrec.build import Builder

    b = Builder(cfg, artifacts, repo, data_dir=data_dir, download=True, log=log_line)
    ds = b.data()
    emb, meta = b.embed(ds)
    b.train(ds, emb, only=models)
    manifest = b.export(ds, emb, meta)
    b.index(ds, emb, manifest)
    b.quantize()


def quick(
    config: ConfigOpt = default_config(),
    versions: VersionsOpt = DEFAULT_VERSIONS,
    data_dir: Annotated[Path | None, typer.Option(envvar="FALCONREC_DATA_DIR", help="dataset directory")] = None,
) -> None:
    """Build a quick first version (few epochs, no SASRec), add it and make it current."""
    from training.config import load_config

    cfg = quick_config(load_config(config), QUICK_EPOCHS)
    artifacts, repo = WORK / "quick" / "artifacts", WORK / "quick" / "model_repository"
    _build(cfg, artifacts, repo, data_dir, {"towers", "ranker"})
    shared = Path("artifacts") / "cache"  # the full build re-reads these embeddings instead of recomputing them
    if (artifacts / "cache").is_dir() and not shared.exists():
        shutil.copytree(artifacts / "cache", shared)
    epochs = ", ".join(f"{k} {v}" for k, v in QUICK_EPOCHS.items())
    add_and_promote(config, artifacts, repo, versions, f"quick: {epochs} epochs", force=True)


def full(
    config: ConfigOpt = default_config(),
    versions: VersionsOpt = DEFAULT_VERSIONS,
    data_dir: Annotated[Path | None, typer.Option(envvar="FALCONREC_DATA_DIR", help="dataset directory")] = None,
) -> None:
    """Build the config's serving models with every epoch (towers and ranker; SASRec is `falconrec build`'s, for
    `falconrec eval`), add them as a version and promote it through the gate."""
    from training.config import load_config

    artifacts, repo = Path("artifacts"), Path("model_repository")
    _build(load_config(config), artifacts, repo, data_dir, {"towers", "ranker"})
    add_and_promote(config, artifacts, repo, versions, "full build", force=False)


def retrain(
    config: ConfigOpt = default_config(),
    versions: VersionsOpt = DEFAULT_VERSIONS,
    epochs: Annotated[
        int, typer.Option(min=1, help="epochs of the towers and the ranker, from the current weights")
    ] = 5,
    tolerance: Annotated[float, typer.Option(help="the gate: how much worse a validation metric may be")] = 0.005,
    force: Annotated[bool, typer.Option(help="promote whatever the gate says")] = False,
    every: Annotated[
        str | None, typer.Option(help="keep running: retrain again this long after each start, e.g. 6h, 30m, 1d")
    ] = None,
) -> None:
    """Train a new version on what the service has seen (the Redis store: histories with their new events, items
    added live), warm-started from the current version, and submit it to the gate (validation metrics, and both
    versions on a holdout of each updated user's newest event). Its own process, never the server's; --every keeps
    it running on a schedule, or use cron / a Kubernetes CronJob (docs/operations.md)."""
    import os
    import time

    redis_url = os.environ.get("FALCONREC_REDIS_URL")
    if not redis_url:
        raise typer.BadParameter("retrain reads the service's store: set FALCONREC_REDIS_URL (an in-process store "
                                 "lives and dies with its server process)")  # fmt: skip
    period = parse_period(every) if every else None
    while True:
        start = time.monotonic()
        try:
            _retrain_once(config, versions, epochs, tolerance, force, redis_url)
        except (typer.Exit, Exception) as e:  # the gate said no, or Redis was away: the schedule goes on
            if period is None:
                raise
            why = f"exit {e.exit_code}" if isinstance(e, typer.Exit) else f"{type(e).__name__}: {e}"
            console.print(f"retrain: {why}; the current version stays; next run in {every}")
        if period is None:
            return
        time.sleep(max(0.0, period - (time.monotonic() - start)))


def parse_period(text: str) -> float:
    """'90s', '30m', '6h', '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise typer.BadParameter(f"--every {text!r}: a number and one of s, m, h, d (e.g. 6h)") from None
    if not math.isfinite(value) or value <= 0:
        raise typer.BadParameter(f"--every {text!r}: must be a positive, finite period")
    return value


def _retrain_once(config: str, versions: Path, epochs: int, tolerance: float, force: bool, redis_url: str) -> None:
    import time

    from falconrec.models import _store

    current = _store(versions).current()
    if current is None:
        raise typer.BadParameter(f"no current version in {versions}: nothing to start from")
    work = WORK / f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    artifacts, repo = work / "artifacts", work / "model_repository"
    try:
        holdout = _retrain_build(config, _store(versions), current, artifacts, repo, epochs, redis_url)
        note = f"retrain of {current}, {epochs} epochs"
        add_and_promote(config, artifacts, repo, versions, note, force, tolerance, holdout)
    finally:  # the version holds its own copy (models add): a schedule must not fill the disk with builds
        shutil.rmtree(work, ignore_errors=True)


def _retrain_build(config: str, vs, current: str, artifacts: Path, repo: Path, epochs: int, redis_url: str) -> dict:  # noqa: ANN001
    from falconrec.build import Builder
    from service.artifacts import ArtifactPaths
    from training.config import load_config
    from training.dataset import Dataset
    from training.embed import load_embeddings, save_embeddings, texts_hash
    from training.retrain import snapshot

    base_paths = ArtifactPaths.for_config(config, vs.artifacts(current))
    base = Dataset.load(base_paths.data)
    base_emb, meta = load_embeddings(base_paths.content_emb)
    snap = snapshot(redis_url, base, base_emb)
    console.print(
        f"retrain from {current}: {snap.new_items} live items, {snap.new_events} new events, {snap.new_users} new users"
    )
    cfg = quick_config(load_config(config), {"towers": epochs, "ranker": epochs})
    b = Builder(cfg, artifacts, repo, log=log_line)
    snap.dataset.save(b.paths.data)
    meta = {**meta, "texts_hash": texts_hash(snap.dataset.item_texts)}
    save_embeddings(b.paths.content_emb, snap.emb, meta)
    ds = Dataset.load(b.paths.data)
    b.state["data"] = {"inputs": "snapshot", "info": {"fingerprint": ds.fingerprint(), "users": ds.num_users}}
    b.init = {"towers": base_paths.towers, "ranker": base_paths.ranker}
    b.train(ds, snap.emb, only={"towers", "ranker"})
    manifest = b.export(ds, snap.emb, meta)
    b.index(ds, snap.emb, manifest)
    b.quantize()
    return _holdout(cfg, ds, snap, current, {"candidate": b.paths.ranker, "current": base_paths.ranker})


def _holdout(cfg, ds, snap, current: str, ckpts: dict[str, Path]) -> dict:  # noqa: ANN001
    """Both rankers on each updated user's newest event (never trained on): what the gate compares besides
    validation."""
    from service.versions import HOLDOUT_MIN_USERS
    from training.retrain import holdout_metrics

    if not snap.updated:
        console.print("holdout: no user has new events; the gate compares validation metrics only")
        return {}
    got = holdout_metrics(ds, snap.updated, snap.emb, ckpts, cfg.ranker.valid_rerank, cfg.seed)
    n = got["candidate"]["users"]
    for name, m in got.items():
        console.print(f"holdout ({n} users' newest event) {name}: HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
    if n < HOLDOUT_MIN_USERS:
        console.print(f"holdout: {n} users, fewer than {HOLDOUT_MIN_USERS}: kept for the record, not gated on")
    return {"against": current, "users": n, **got}
