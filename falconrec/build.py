"""`falconrec build`: data -> embed -> train -> export -> index, skipping steps whose inputs did not change.

Each step records the hash of its inputs in artifacts/<config>/build.json; a step runs again only when
that hash changes or its outputs are missing. Ends with a summary table.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.artifacts import ArtifactPaths
from service.contract import (
    MANIFEST,
    MODEL_NAMES,
    QUANTIZATION_REPORT,
    Manifest,
    ModelDims,
    onnx_path,
)
from training.config import BuildConfig
from training.data import Dataset, default_ml1m_dir, load_ml1m, make_synthetic, sha256_file


def _h(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: Path) -> str:
    return sha256_file(path)[:16]


@dataclass
class StepResult:
    name: str
    ran: bool
    seconds: float
    outputs: list[Path]
    info: dict = field(default_factory=dict)


# Bumped when the towers' model changes for the same config, so a build retrains them instead of exporting old
# weights into new graphs. 2: the user tower's positions count from the oldest item (user_tower_extend).
TOWERS_REVISION = 2


def train_inputs(cfg: BuildConfig) -> dict[str, str]:
    """Hash of the config each model's training reads (data and embeddings aside, but with the validation
    split): the towers take only max_len from [ranker], SASRec its sizes, batches and negatives (not the ranker's
    budget or schedule)."""
    from training.train import SASREC_FROM_RANKER

    r, split = cfg.ranker, cfg.data.valid_holdout
    return {
        "towers": _h(cfg.section_hash("towers"), r.max_len, split, TOWERS_REVISION),
        "ranker": _h(cfg.section_hash("ranker"), split),
        "sasrec": _h(cfg.section_hash("sasrec"), {k: getattr(r, k) for k in SASREC_FROM_RANKER}, split),
    }


class Builder:
    def __init__(
        self,
        cfg: BuildConfig,
        artifacts: Path,
        repo: Path,
        data_dir: Path | None = None,
        download: bool = False,
        force: bool = False,
        log: Callable[[str], None] = print,
        tensorrt: bool = False,
    ):
        self.cfg = cfg
        self.paths = ArtifactPaths.for_config(cfg.name, artifacts)
        self.repo = Path(repo)
        self.data_dir = data_dir
        self.download = download
        self.force = force
        self.log = log
        self.tensorrt = tensorrt
        self.init: dict[str, Path] = {}  # model name -> checkpoint to warm-start from (falconrec/retrain.py)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.state: dict = json.loads(self.paths.build_state.read_text()) if self.paths.build_state.exists() else {}
        self.results: list[StepResult] = []

    # --- step bookkeeping --------------------------------------------------------------------------
    def _step(self, name: str, inputs: str, outputs: list[Path], run: Callable[[], dict]) -> StepResult:
        prev = self.state.get(name, {})
        fresh = prev.get("inputs") == inputs and all(p.exists() for p in outputs)
        if fresh and not self.force:
            res = StepResult(name, False, 0.0, outputs, prev.get("info", {}))
            self.log(f"[{name}] up to date")
        else:
            self.log(f"[{name}] running")
            t = time.time()
            info = run()
            res = StepResult(name, True, time.time() - t, outputs, info)
            self.state[name] = {"inputs": inputs, "info": info, "seconds": res.seconds}
            self.paths.build_state.write_text(json.dumps(self.state, indent=2))
        self.results.append(res)
        return res

    # --- steps ---------------------------------------------------------------------------------------
    def _data_sources(self) -> list[str]:
        """Hashes of the files the data step reads, so that changing one re-runs it (and, via the fingerprint,
        whatever trains on it)."""
        c = self.cfg.data
        if c.source == "ml1m":
            d = Path(self.data_dir) if self.data_dir else default_ml1m_dir()
            if (d / "ratings.dat").exists():
                return [file_hash(d / f) for f in ("ratings.dat", "movies.dat")]
            return [str(d)]
        if c.source == "files":
            from training.dataset_files import expand_paths

            return [f"{p}:{file_hash(p)}" for spec in (c.interactions, c.items) for p in expand_paths(spec)]
        return []

    def _load(self) -> Dataset:
        c = self.cfg.data
        if c.source == "ml1m":
            return load_ml1m(self.data_dir, download=self.download, options=c.load_options())
        if c.source == "synthetic":
            return make_synthetic(c.num_users, c.num_items, seed=c.seed)
        from training.dataset_files import load_files

        return load_files(c.interactions, c.items, c.load_options(), name=self.cfg.name)  # eval tables say its name

    def data(self) -> Dataset:
        inputs = _h(self.cfg.section_hash("data"), self._data_sources())

        def run() -> dict:
            ds = self._load()
            ds.save(self.paths.data)
            info = {
                "users": ds.num_users,
                "items": ds.num_items,
                "interactions": int(sum(map(len, ds.seqs))),
                "fingerprint": ds.fingerprint(),
                "id_kinds": {"item": ds.meta["item_id_kind"], "user": ds.meta["user_id_kind"]},
            }
            report = ds.meta.get("load_report")
            if report is not None:  # what was read, kept and dropped, and why (also in build.json)
                self.log(report.summary())
                info["report"] = report.as_dict()
            return info

        self._step("data", inputs, [self.paths.data], run)
        return Dataset.load(self.paths.data)

    def embed(self, ds: Dataset) -> tuple[np.ndarray, dict]:
        from training.embed import embed_texts, load_embeddings, save_embeddings, texts_hash

        inputs = _h(self.cfg.section_hash("embed"), texts_hash(ds.item_texts))

        def run() -> dict:
            emb, meta = embed_texts(
                ds.item_texts, self.cfg.embed.model, self.paths.embed_cache, self.cfg.embed.batch_size
            )
            save_embeddings(self.paths.content_emb, emb, meta)
            return meta

        self._step("embed", inputs, [self.paths.content_emb], run)
        return load_embeddings(self.paths.content_emb, ds.item_texts)

    def train(self, ds: Dataset, emb: np.ndarray, only: set[str] | None = None) -> None:
        from training import train as T

        base = _h(self.state["data"]["info"]["fingerprint"], file_hash(self.paths.content_emb), self.cfg.seed)
        inputs = train_inputs(self.cfg)
        jobs = [
            ("towers", inputs["towers"], self.paths.towers, T.train_towers),
            ("ranker", inputs["ranker"], self.paths.ranker, T.train_ranker),
            ("sasrec", inputs["sasrec"], self.paths.sasrec, T.train_sasrec),
        ]
        for name, section_hash, path, fn in jobs:
            if only is not None and name not in only:
                continue
            init = self.init.get(name)  # a retrain starts from the current version's weights
            extra = {"init": init} if init is not None else {}

            def run(fn=fn, path=path, extra=extra) -> dict:
                model, kwargs, info = fn(self.cfg, ds, emb, log=self.log, **extra)
                T.save_checkpoint(path, model, kwargs, {"train": info})
                return {k: v for k, v in info.items() if k != "epochs"}

            inputs = _h(base, section_hash) if init is None else _h(base, section_hash, file_hash(init))
            self._step(f"train-{name}", inputs, [path], run)

    def dims(self, ds: Dataset, emb: np.ndarray) -> ModelDims:
        return self.cfg.model_dims(int(emb.shape[1]), ds.num_items)

    def model_version(self) -> str:
        return _h(file_hash(self.paths.towers), file_hash(self.paths.ranker))[:12]

    def export(self, ds: Dataset, emb: np.ndarray, emb_meta: dict) -> Manifest:
        from exporters.onnx_export import GRAPH_REVISION, export_all
        from exporters.triton_config import TritonOptions, write_configs
        from training import train as T
        from training.models import HSTURanker, TwoTower

        dims = self.dims(ds, emb)
        version = self.model_version()
        manifest = Manifest(
            config=self.cfg.name,
            model_version=version,
            dims=dims,
            embedding_model=emb_meta["model"],
            embedding_version=_h(emb_meta["model"], emb_meta["texts_hash"])[:12],
            num_candidates=self.cfg.serve.num_candidates,
            microbatch=self.cfg.serve.microbatch,
        )
        outputs = [onnx_path(self.repo, m) for m in MODEL_NAMES] + [self.repo / n / "config.pbtxt" for n in MODEL_NAMES]

        def run() -> dict:
            towers = T.load_checkpoint(self.paths.towers, TwoTower)
            ranker = T.load_checkpoint(self.paths.ranker, HSTURanker)
            for m in MODEL_NAMES:  # a half-written repository must never look complete
                shutil.rmtree(self.repo / m, ignore_errors=True)
            (self.repo / QUANTIZATION_REPORT).unlink(missing_ok=True)  # its int8 graphs went with them
            export_all(towers, ranker, dims, self.repo)
            write_configs(self.repo, dims, TritonOptions(tensorrt=self.tensorrt))
            manifest.write(self.repo)
            return {
                "model_version": version,
                "onnx_bytes": sum(onnx_path(self.repo, m).stat().st_size for m in MODEL_NAMES),
            }

        inputs = _h(
            version,
            GRAPH_REVISION,
            str(self.repo.resolve()),
            self.tensorrt,
            manifest.embedding_version,
            self.cfg.section_hash("serve"),
        )
        res = self._step("export", inputs, outputs, run)
        if not res.ran and not (self.repo / MANIFEST).exists():
            manifest.write(self.repo)
        return manifest

    def index(self, ds: Dataset, emb: np.ndarray, manifest: Manifest) -> None:
        from exporters.faiss_index import INDEX_FILE, build_index, save_index
        from exporters.item_tables import item_tables
        from service.backends.onnx import OnnxBackend
        from service.pipeline.item_tokens import token_paths

        def run() -> dict:
            # Vectors and tokens come from the exported ONNX graphs: exactly what the service would compute.
            backend = OnnxBackend(self.repo, manifest.dims, providers=["CPUExecutionProvider"])
            ids = np.arange(1, ds.num_items + 1, dtype=np.int64)
            tables = item_tables(backend, emb, ids)
            index, kind = build_index(
                tables.vectors, ids, self.cfg.index.kind, self.cfg.index.exact_below, self.cfg.index.hnsw_m
            )
            save_index(index, self.paths.index_dir, kind, manifest.model_version)
            tables.save_tokens(self.paths.index_dir)
            return {"kind": kind, "count": int(index.ntotal), "token_bytes": tables.token_bytes}

        inputs = _h(manifest.model_version, self.cfg.section_hash("index"))
        self._step("index", inputs, [self.paths.index_dir / INDEX_FILE, *token_paths(self.paths.index_dir)], run)

    def quantize(self) -> Manifest:
        """The config's `[serve] int8` graphs in int8, kept only when the served cascade passes the quality check
        against fp32 (exporters/quantize.py); the fp32 graphs stay beside them. Runs after the index: the check
        scores the served cascade. TensorRT builds stay fp32 (its engines choose their own precision)."""
        from exporters.quantize import QUANTIZE_REVISION, apply_int8, restore_fp32, rule

        wanted = self.cfg.serve.int8
        if wanted and self.tensorrt:
            self.log(f"[int8] {', '.join(wanted)}: not for a TensorRT build, serving fp32")
            wanted = ()
        if not wanted:
            restore_fp32(self.repo)  # a repository an earlier config quantized
            return Manifest.read(self.repo)

        def run() -> dict:
            check = apply_int8(self.cfg.name, self.paths.root.parent, self.repo, wanted)
            assert check is not None
            verdict = "kept" if check.passed else "failed its check: serving fp32"
            self.log(
                f"[int8] {', '.join(wanted)} {verdict} (cascade HR@10 {check.hr10_int8:.4f} vs fp32 "
                f"{check.hr10_fp32:.4f}, top-10 overlap {check.top10_overlap:.4f})"
            )
            return {"int8": list(wanted) if check.passed else [], "top10_overlap": round(check.top10_overlap, 4)}

        prev = self.state.get("int8", {}).get("info", {})
        if sorted(prev.get("int8", [])) != sorted(Manifest.read(self.repo).int8):
            (self.repo / QUANTIZATION_REPORT).unlink(
                missing_ok=True
            )  # the repository is not what that run left: redo it
        index_inputs = self.state.get("index", {}).get("inputs")
        inputs = _h(self.state.get("export", {}).get("inputs"), index_inputs, wanted, QUANTIZE_REVISION, rule())
        self._step("int8", inputs, [self.repo / QUANTIZATION_REPORT], run)
        return Manifest.read(self.repo)

    def build(self) -> list[StepResult]:
        ds = self.data()
        emb, meta = self.embed(ds)
        self.train(ds, emb)
        manifest = self.export(ds, emb, meta)
        self.index(ds, emb, manifest)
        self.quantize()
        return self.results


def summary_rows(results: list[StepResult]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for r in results:
        size = sum(p.stat().st_size for p in r.outputs if p.exists())
        metric = ""
        if "best_valid_ndcg@10" in r.info:
            metric = f"valid NDCG@10 {r.info['best_valid_ndcg@10']:.4f}"
            if "epochs_run" in r.info:
                metric += (
                    f", best epoch {r.info['best_epoch']} of {r.info['epochs_run']},"
                    f" {r.info['sec_per_epoch']:.1f} s/epoch ({r.info['stopped']})"
                )
        elif "users" in r.info:
            metric = f"{r.info['users']} users, {r.info['items']} items, {r.info['interactions']} events"
            metric += _dropped(r.info.get("report", {}))
        elif "dim" in r.info:
            metric = f"{r.info['model']} dim {r.info['dim']}"
        elif "kind" in r.info:
            metric = f"{r.info['kind']} over {r.info['count']} items"
        elif "model_version" in r.info:
            metric = f"version {r.info['model_version']}"
        elif "top10_overlap" in r.info:
            kept = ", ".join(r.info["int8"]) or "none (check failed)"
            metric = f"int8: {kept}; top-10 overlap {r.info['top10_overlap']:.4f}"
        rows.append((r.name, "ran" if r.ran else "cached", f"{r.seconds:.1f}s", f"{size / 1e6:.2f} MB", metric))
    return rows


def _dropped(report: dict) -> str:
    """The summary's note when the loader dropped anything (the log and build.json say why)."""
    parts = []
    for key, word in (("interactions", "events"), ("users", "users"), ("items", "items")):
        if key in report:
            n = report[key].get("read", report[key].get("seen", 0)) - report[key]["kept"]
            if n:
                parts.append(f"{n} {word}")
    return f", dropped {', '.join(parts)}" if parts else ""
