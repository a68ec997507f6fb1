"""The learning-rate schedule of a fit (training/schedule.py) and how _fit ends with it (CPU, no data)."""

from __future__ import annotations

import pytest

from training.schedule import DecaySchedule


def test_no_decay_is_constant_and_a_plateau_stops():
    s = DecaySchedule(lr=1e-3, frac=0.0, max_epochs=50)
    assert s.maybe_start(epochs_done=40, plateau=False)
    assert s.rate(49.5) == 1e-3 and not s.decaying
    assert not s.maybe_start(epochs_done=5, plateau=True)


def test_decay_starts_before_the_last_share_of_epochs_and_reaches_zero_at_max_epochs():
    s = DecaySchedule(lr=1e-3, frac=0.3, max_epochs=100)
    s.maybe_start(epochs_done=60, plateau=False)
    assert not s.decaying  # 40 epochs left: the next one still ends before the last 30
    s.maybe_start(epochs_done=70, plateau=False)
    assert s.decaying and (s.start, s.length) == (70.0, pytest.approx(30.0))
    assert s.rate(70.0) == pytest.approx(1e-3)
    assert s.rate(85.0) == pytest.approx(0.5e-3)
    assert s.rate(100.0) == 0.0
    assert not s.finished(90) and s.finished(100)


def test_plateau_starts_the_decay_instead_of_stopping():
    s = DecaySchedule(lr=1e-3, frac=0.25, max_epochs=100)
    assert s.maybe_start(epochs_done=20, plateau=True)
    assert s.decaying and (s.start, s.length) == (20, 25)
    assert s.rate(32.5) == pytest.approx(0.5e-3)
    assert not s.finished(44) and s.finished(45)


def test_decay_never_runs_past_max_epochs():
    s = DecaySchedule(lr=1e-3, frac=0.5, max_epochs=100)
    s.maybe_start(epochs_done=90, plateau=True)
    assert s.length == pytest.approx(10.0)
    assert s.rate(100.0) == 0.0


def test_the_schedule_never_reads_the_clock():
    """Rule 5: the same epochs give the same rates on a fast and a slow machine (the old schedule decayed over a
    wall-clock budget: 84 ranker epochs on one machine, 103 on another of the same kind)."""
    import inspect

    import training.schedule

    assert "time" not in {name for name, _ in inspect.getmembers(training.schedule, inspect.ismodule)}
    a, b = DecaySchedule(1e-3, 0.3, 100), DecaySchedule(1e-3, 0.3, 100)
    for e in range(1, 101):
        assert a.maybe_start(e, plateau=e == 55) == b.maybe_start(e, plateau=e == 55)
        assert a.rate(e + 0.5) == b.rate(e + 0.5)


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
    assert not decayed["capped"]


def test_fit_reports_a_run_the_safety_cap_ended():
    """The wall-clock budget is a safety cap only: a run it ends says so (its model depends on the machine)."""
    import numpy as np
    import torch

    from training import train as T
    from training.data import Dataset

    ds = Dataset(
        "t", np.arange(1, 6), [str(i) for i in range(5)], np.arange(4), [np.arange(1, 5)] * 4, [np.arange(4)] * 4
    )
    model = torch.nn.Linear(2, 1)
    step = lambda users, rng: model(torch.ones(len(users), 2)).pow(2).mean()  # noqa: E731
    validate = lambda: {"ndcg@10": 0.5, "hr@10": 0.0}  # noqa: E731
    plan = T.FitPlan(max_epochs=40, patience=100, budget_s=1e-9, batch_size=2, lr=1e-2)
    out = T._fit("m", model, plan, ds, step, validate, 0, lambda m: None, torch.zeros(6, 2))[1]
    assert out["capped"] and out["epochs_run"] == 1 and "SAFETY CAP" in out["stopped"]
