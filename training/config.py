"""Build configs: TOML files in training/configs/, loaded into typed dataclasses (stdlib only)."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from service.contract import ModelDims

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataCfg:
    source: str = "synthetic"  # "synthetic" | "ml1m"
    num_users: int = 300
    num_items: int = 400
    seed: int = 0
    # Whose second-last item training never sees: "all" users, or only the validation users (the reference's
    # split: everyone else trains on all but the test item, so the transition next to it is learned).
    valid_holdout: str = "all"

    def __post_init__(self) -> None:
        if self.valid_holdout not in ("all", "valid_users"):
            raise ValueError(f'[data] valid_holdout must be "all" or "valid_users", got {self.valid_holdout!r}')


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
    negative_pool: int = 1024  # ... from a pool of this many uniformly drawn items (whole catalog if smaller)
    target_positions: int = 4  # positions per sequence trained through the candidate path
    cand_negatives: int = 32  # negatives per such position (each one is a candidate token: costly)
    temperature: float = 0.05
    aux_weight: float = 1.0
    eval_every: int = 1  # validate the ranker every N epochs (its full-catalog validation is the costly one)
    valid_rerank: int = 0  # > 0: validate on the full score of the next-item score's top N only (cheaper)
    lr_decay: float = 0.0  # > 0: end with a linear decay of lr to zero over this share of the budget (schedule.py)


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
