"""Where the build puts each artifact (one place for these names; build and service both use it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARTIFACTS = Path("artifacts")
DEFAULT_REPOSITORY = Path("model_repository")


def config_name(config: str) -> str:
    """A build config's name: `ml1m` as given, or the stem of a `.toml` path (`path/to/mine.toml` -> `mine`),
    as the build names its artifacts folder. Every command that takes --config goes through here."""
    path = Path(config)
    return path.stem if path.suffix else config


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path  # artifacts/<config>

    @classmethod
    def for_config(cls, config: str, base: Path = DEFAULT_ARTIFACTS) -> ArtifactPaths:
        return cls(Path(base) / config_name(config))

    @property
    def data(self) -> Path:
        return self.root / "data.npz"

    @property
    def content_emb(self) -> Path:  # float16 [N, E]; metadata beside it as .json
        return self.root / "content_emb.npy"

    @property
    def towers(self) -> Path:
        return self.root / "towers.safetensors"

    @property
    def ranker(self) -> Path:
        return self.root / "ranker.safetensors"

    @property
    def sasrec(self) -> Path:
        return self.root / "sasrec.safetensors"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def build_state(self) -> Path:
        return self.root / "build.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def embed_cache(self) -> Path:  # shared by all configs: keyed by text model and text hash
        return self.root.parent / "cache" / "embeddings"
