"""The learning-rate schedule of a fit (training/schedule.py) and how _fit ends with it (CPU, no data)."""

from __future__ import annotations

import pytest

from training.schedule import DecaySchedule


def test_no_decay_is_constant_and_a_plateau_stops():
    s = DecaySchedule(lr=1e-3, frac=0.0, budget_s=100.0, max_epochs=50)
    assert s.maybe_start(elapsed_s=95.0, epochs_done=40, epoch_cost_s=2.0, plateau=False)
    assert s.rate(99.0, 49.5) == 1e-3 and not s.decaying
    assert not s.maybe_start(elapsed_s=10.0, epochs_done=5, epoch_cost_s=2.0, plateau=True)


def test_budget_decay_starts_before_the_last_share_and_reaches_zero_at_the_budget():
    s = DecaySchedule(lr=1e-3, frac=0.3, budget_s=100.0, max_epochs=1000)
    s.maybe_start(elapsed_s=60.0, epochs_done=30, epoch_cost_s=2.0, plateau=False)
    assert not s.decaying  # 40 s left: the next epoch still ends before the last 30 s
    s.maybe_start(elapsed_s=69.0, epochs_done=34, epoch_cost_s=2.0, plateau=False)
    assert s.decaying and s.start == 69.0 and s.length == pytest.approx(30.0)
    assert s.rate(69.0, 34) == pytest.approx(1e-3)
    assert s.rate(84.0, 41) == pytest.approx(0.5e-3)
    assert s.rate(99.0, 48) == 0.0
    assert not s.finished(80.0, 40, 2.0) and s.finished(98.5, 48, 2.0)


def test_plateau_starts_the_decay_instead_of_stopping():
    s = DecaySchedule(lr=1e-3, frac=0.25, budget_s=0.0, max_epochs=100)  # no budget: counted in epochs
    assert s.maybe_start(elapsed_s=1e6, epochs_done=20, epoch_cost_s=1e6, plateau=True)
    assert s.decaying and (s.start, s.length) == (20, 25)
    assert s.rate(0.0, 32.5) == pytest.approx(0.5e-3)
    assert not s.finished(0.0, 44, 1.0) and s.finished(0.0, 45, 1.0)


def test_decay_never_runs_past_the_budget():
    s = DecaySchedule(lr=1e-3, frac=0.5, budget_s=100.0, max_epochs=1000)
    s.maybe_start(elapsed_s=90.0, epochs_done=45, epoch_cost_s=2.0, plateau=True)
    assert s.length == pytest.approx(10.0)
    assert s.rate(100.0, 50) == 0.0


def test_fit_decays_after_a_plateau_and_keeps_the_best_epoch():
    """A validation that never improves after epoch 1: plain early stopping ends at 1 + patience; with
    lr_decay the plateau starts the decay, which then runs its share of max_epochs, the rate falling to 0."""
    import numpy as np
    import torch

    from training import train as T
    from training.data import Dataset

    ds = Dataset(
        name="t",
        item_raw_ids=np.arange(1, 6),
        item_texts=[str(i) for i in range(5)],
        user_raw_ids=np.arange(4),
        seqs=[np.array([1, 2, 3, 4], np.int64)] * 4,
        times=[np.arange(4, dtype=np.int64)] * 4,
    )
    scores = iter([0.5] + [0.1] * 100)

    def run(lr_decay: float) -> dict:
        model = torch.nn.Linear(2, 1)
        step = lambda users, rng: model(torch.ones(len(users), 2)).pow(2).mean()  # noqa: E731
        validate = lambda: {"ndcg@10": next(scores), "hr@10": 0.0}  # noqa: E731
        plan = T.FitPlan(max_epochs=40, patience=3, budget_s=0, batch_size=2, lr=1e-2, lr_decay=lr_decay)
        return T._fit("m", model, plan, ds, step, validate, 0, lambda m: None, torch.zeros(6, 2))[1]

    plain = run(0.0)
    assert plain["epochs_run"] == 4 and plain["best_epoch"] == 1 and plain["decay_from_epoch"] == 0
    decayed = run(0.25)
    assert decayed["best_epoch"] == 1 and decayed["decay_from_epoch"] == 5
    lrs = [row["lr"] for row in decayed["epochs"]]
    assert lrs[:4] == [1e-2] * 4 and all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert decayed["epochs_run"] == 4 + 10 and lrs[-1] < 1e-2 / 10
