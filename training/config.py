"""Build configs: TOML files in training/configs/, loaded into typed dataclasses (stdlib only)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from service.contract import ModelDims, check_int8
from training.text_template import template_fields

CONFIG_DIR = Path(__file__).parent / "configs"


SOURCES = ("synthetic", "ml1m", "files")
CHOICES = {
    "on_bad_rows": ("fail", "skip"),
    "time_unit": ("auto", "s", "ms"),
    "item_id_kind": ("auto", "int", "str"),
    "user_id_kind": ("auto", "int", "str"),
}
COLUMNS = ("user_col", "item_col", "time_col", "event_col", "weight_col", "text_col", "title_col")


@dataclass(frozen=True)
class DataCfg:
    source: str = "synthetic"  # "synthetic" | "ml1m" | "files" (docs/data.md)
    num_users: int = 300  # synthetic only
    num_items: int = 400
    seed: int = 0
    # Whose second-last item training never sees: "all" users, or only the validation users (the reference's
    # split: everyone else trains on all but the test item, so the transition next to it is learned).
    valid_holdout: str = "all"
    # source = "files": a file, a directory of files, each Parquet, CSV/TSV or JSON Lines (.gz/.zst/.bz2 too).
    interactions: str = ""
    items: str = ""
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    event_col: str = "event"
    weight_col: str = "weight"
    text_col: str = "text"
    title_col: str = "title"
    text_template: str = ""  # e.g. "{title} | {categories}"; empty: the text column
    time_unit: str = "auto"  # integer timestamps: "s", "ms", or "auto" (ms when any is >= 1e11)
    item_id_kind: str = "auto"  # "auto": int when every id is an integer, else str
    user_id_kind: str = "auto"
    keep_events: tuple[str, ...] = ()  # only these event types (empty: all)
    min_weight: float | None = None  # drop interactions whose weight is below this
    # Every source: what a bad row does, and the k-core (min_user_interactions >= 3 leaves a history to learn from
    # beside the validation and test items).
    on_bad_rows: str = "fail"
    min_user_interactions: int = 3
    min_item_interactions: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "keep_events", tuple(self.keep_events))  # TOML gives a list
        if self.valid_holdout not in ("all", "valid_users"):
            raise ValueError(f'[data] valid_holdout must be "all" or "valid_users", got {self.valid_holdout!r}')
        if self.source not in SOURCES:
            raise ValueError(f"[data] source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"[data] {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        for key in ("min_user_interactions", "min_item_interactions"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"[data] {key} must be a whole number >= 0, got {v!r}")
        for key in COLUMNS:
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"[data] {key} must name a column, got {getattr(self, key)!r}")
        if not all(isinstance(e, str) for e in self.keep_events):
            raise ValueError(f"[data] keep_events must be a list of strings, got {list(self.keep_events)!r}")
        template_fields(self.text_template)
        if self.source == "files":
            missing = [k for k in ("interactions", "items") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f'[data] source = "files" needs {" and ".join(missing)} (a path each), '
                    "or pass --interactions and --items to falconrec build"
                )

    def load_options(self):  # -> training.dataset_files.LoadOptions (pyarrow is imported only when data is read)
        from training.dataset_files import LoadOptions

        names = {f.name for f in fields(LoadOptions)}
        return LoadOptions(**{k: v for k, v in asdict(self).items() if k in names})


@dataclass(frozen=True)
class EmbedCfg:
    model: str = "minilm"  # "minilm" | "smollm2" | a local Hugging Face model directory
    batch_size: int = 64


@dataclass(frozen=True)
class RankerCfg:
    max_len: int = 200
    d_model: int = 50
    num_layers: int = 2
    num_heads: int = 1
    dqk: int = 50
    dv: int = 50
    dropout: float = 0.2
    num_time_buckets: int = 64
    epochs: int = 100  # at most; early stopping on validation usually ends sooner
    patience: int = 5  # validations without a new best before stopping
    train_budget_s: float = 0.0  # wall-clock cap on training (0 = none)
    batch_size: int = 128
    lr: float = 1e-3
    negatives: int = 128  # sampled-softmax negatives of the next-item loss, drawn per position; 0 = full catalog
    negative_pool: int = 1024  # ... from a pool of this many uniform draws (whole catalog if smaller); negatives >=
    # negative_pool shares the pool: every position of a batch scored against all of it (one matmul)
    target_positions: int = 4  # positions per sequence trained through the candidate path
    cand_negatives: int = 32  # negatives per such position (each one is a candidate token: costly)
    temperature: float = 0.05
    aux_weight: float = 1.0
    eval_every: int = 1  # validate the ranker every N epochs (its full-catalog validation is the costly one)
    valid_rerank: int = 0  # > 0: validate on the full score of the next-item score's top N only (cheaper)
    lr_decay: float = 0.0  # > 0: end with a linear decay of lr to zero over this share of the budget (schedule.py)
    precision: str = "fp32"  # "bf16": training steps under autocast (the exported graphs stay fp32)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f'[ranker] precision must be "fp32" or "bf16", got {self.precision!r}')
        if self.negatives < 0 or self.negative_pool < 1:
            raise ValueError("[ranker] negatives must be >= 0 (0 = full catalog) and negative_pool >= 1")


@dataclass(frozen=True)
class TowersCfg:
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 2
    epochs: int = 100
    patience: int = 5
    train_budget_s: float = 0.0
    batch_size: int = 128
    lr: float = 1e-3
    negatives: int = 512
    negative_pool: int = 2048
    temperature: float = 0.05
    lr_decay: float = 0.0


@dataclass(frozen=True)
class SasrecCfg:
    """The baseline shares the ranker's sizes, batch, negatives and temperature; these are its own."""

    epochs: int = 100
    patience: int = 5
    train_budget_s: float = 0.0
    lr: float = 1e-3
    lr_decay: float = 0.0


@dataclass(frozen=True)
class ColdStartCfg:
    """`falconrec cold-start` only (the build ignores it): hold this fraction of items out of training."""

    fraction: float = 0.1
    cascade_sizes: tuple[int, ...] = (200, 1000)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cascade_sizes", tuple(self.cascade_sizes))  # TOML gives a list


@dataclass(frozen=True)
class IndexCfg:
    kind: str = "auto"  # "auto" (flat below exact_below items, else ivf) | "flat" | "hnsw" | "ivf"
    hnsw_m: int = 32
    exact_below: int = 50_000


@dataclass(frozen=True)
class ServeCfg:
    num_candidates: int = 1000
    microbatch: int = 256
    # Graphs served with int8 weight matmuls (CPU builds; `falconrec quantize` says what it measures). The build
    # keeps them only when the served cascade passes the quality check against fp32 (exporters/quantize.py).
    int8: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "int8", check_int8(self.int8))  # a TOML list, checked
        except ValueError as e:
            raise ValueError(f"[serve] {e}") from None


@dataclass(frozen=True)
class BuildConfig:
    name: str
    data: DataCfg = field(default_factory=DataCfg)
    embed: EmbedCfg = field(default_factory=EmbedCfg)
    ranker: RankerCfg = field(default_factory=RankerCfg)
    towers: TowersCfg = field(default_factory=TowersCfg)
    sasrec: SasrecCfg = field(default_factory=SasrecCfg)
    coldstart: ColdStartCfg = field(default_factory=ColdStartCfg)
    index: IndexCfg = field(default_factory=IndexCfg)
    serve: ServeCfg = field(default_factory=ServeCfg)
    seed: int = 0

    def model_dims(self, content_dim: int, num_items: int) -> ModelDims:
        """The served models' sizes: the one mapping from this config to them (the ranker's and SASRec's
        constructor arguments and the manifest's dims are all read from it)."""
        r, t = self.ranker, self.towers
        return ModelDims(
            content_dim=content_dim,
            tower_dim=t.d_model,
            max_len=r.max_len,
            d_model=r.d_model,
            num_layers=r.num_layers,
            num_heads=r.num_heads,
            dqk=r.dqk,
            dv=r.dv,
            num_items=num_items,
            num_time_buckets=r.num_time_buckets,
            tower_layers=t.num_layers,
        )

    def section_hash(self, *sections: str) -> str:
        payload = {s: asdict(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_config(name_or_path: str) -> BuildConfig:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no build config {name_or_path!r}; choose one of {', '.join(available_configs())} or give a .toml path"
        )
    raw = tomllib.loads(path.read_text())
    kwargs: dict = {"name": path.stem, "seed": int(raw.pop("seed", 0))}
    for f in fields(BuildConfig):
        if f.name in ("name", "seed"):
            continue
        section = raw.pop(f.name, {})
        cls = f.default_factory  # type: ignore[misc]
        known = {x.name for x in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys in [{f.name}]: {', '.join(sorted(unknown))}")
        kwargs[f.name] = cls(**section)
    if raw:
        raise ValueError(f"{path}: unknown sections {', '.join(sorted(raw))}")
    return BuildConfig(**kwargs)
