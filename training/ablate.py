"""Recipe ablations: train one model for a fixed number of epochs with config fields overridden, and print its
validation curve (budgets and early stopping off, so runs compare epoch for epoch).

    python -m training.ablate sasrec batch_size=16 8
    python -m training.ablate ranker batch_size=16,valid_rerank=200 3
    python -m training.ablate ranker valid_holdout=all 30

Needs `falconrec build --config CONFIG` to have run its data and embed steps (FALCONREC_ABLATE_CONFIG, default
ml1m). Overrides apply to the model's own section, to [ranker], whose sizes SASRec shares, and to [data] (the
training split); the result (per epoch loss, validation and seconds) is written to
artifacts/<config>/ablate-<model>-<overrides>.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from service.artifacts import ArtifactPaths
from training import train as T
from training.config import load_config
from training.data import Dataset
from training.embed import load_embeddings

TRAINERS = {"sasrec": T.train_sasrec, "towers": T.train_towers, "ranker": T.train_ranker}


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _override(section, changes: dict[str, int | float | str], **fixed):
    names = {f.name for f in dataclasses.fields(section)}
    return dataclasses.replace(section, **{k: v for k, v in changes.items() if k in names}, **fixed)


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in TRAINERS:
        raise SystemExit(f"usage: python -m training.ablate {{{','.join(TRAINERS)}}} key=value[,...]|base EPOCHS")
    model, spec, epochs = argv[0], argv[1], int(argv[2])
    changes = {} if spec == "base" else {k: _value(v) for k, v in (kv.split("=", 1) for kv in spec.split(","))}
    cfg = load_config(os.environ.get("FALCONREC_ABLATE_CONFIG", "ml1m"))
    off = dict(epochs=epochs, patience=epochs + 1, train_budget_s=0)
    cfg = dataclasses.replace(
        cfg,
        data=_override(cfg.data, changes),
        ranker=_override(cfg.ranker, changes if model != "towers" else {}, **off),
        towers=_override(cfg.towers, changes if model == "towers" else {}, **off),
        sasrec=_override(cfg.sasrec, changes if model == "sasrec" else {}, **off),
    )
    paths = ArtifactPaths.for_config(cfg.name, Path(os.environ.get("FALCONREC_ARTIFACTS", "artifacts")))
    ds = Dataset.load(paths.data)
    emb, _ = load_embeddings(paths.content_emb, ds.item_texts)
    _, _, info = TRAINERS[model](cfg, ds, emb, log=lambda m: print(m, flush=True))
    out = paths.root / f"ablate-{model}-{spec.replace(',', '_').replace('=', '')}.json"
    out.write_text(json.dumps(info, indent=1))
    print(json.dumps({k: v for k, v in info.items() if k != "epochs"}))


if __name__ == "__main__":
    main(sys.argv[1:])
