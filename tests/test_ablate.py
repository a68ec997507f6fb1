"""`python -m training.ablate`: fixed epochs with overrides, on the tiny build's data and embeddings."""

from __future__ import annotations

import json

import pytest

from training import ablate


def test_ablation_trains_the_given_epochs_with_overrides(tiny_build, monkeypatch, capsys):
    monkeypatch.setenv("FALCONREC_ABLATE_CONFIG", "tiny")
    monkeypatch.setenv("FALCONREC_ARTIFACTS", str(tiny_build.artifacts))
    ablate.main(["sasrec", "batch_size=8,lr=0.002", "2"])
    info = json.loads((tiny_build.artifacts / "tiny" / "ablate-sasrec-batch_size8_lr0.002.json").read_text())
    assert info["epochs_run"] == 2 and info["stopped"] == "max_epochs"  # early stopping and budget off
    assert [e["epoch"] for e in info["epochs"]] == [1, 2] and all("hr@10" in e for e in info["epochs"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["epochs_run"] == 2


def test_ablation_refuses_an_unknown_model():
    with pytest.raises(SystemExit, match="usage"):
        ablate.main(["bert4rec", "base", "1"])


def test_ablation_overrides_reach_the_data_split(tiny_build, monkeypatch):
    # A [data] key is applied (and validated) like a model's own: a bad split is refused by name before training.
    monkeypatch.setenv("FALCONREC_ABLATE_CONFIG", "tiny")
    monkeypatch.setenv("FALCONREC_ARTIFACTS", str(tiny_build.artifacts))
    with pytest.raises(ValueError, match="valid_holdout"):
        ablate.main(["sasrec", "valid_holdout=everyone", "1"])
    assert ablate._value("valid_users") == "valid_users" and ablate._value("16") == 16
