"""Learning rate over a fit: constant, then a linear decay to zero over the last part of training
(warmup-free "warmup-stable-decay"), counted in epochs.

Everything that decides the model counts work, never seconds: two machines of the same kind differed by 30-60 %,
and a schedule over a wall-clock budget gave them different models (84 vs 103 ranker epochs). The decay starts at
whichever comes first: the epoch where only `frac` of max_epochs is left, or the validation plateau (patience used
up), and then runs over `frac` of max_epochs (never past max_epochs). With a constant rate, small-batch training
kept bouncing around a level (ml1m ranker validation HR@10 moved +-0.02 from epoch to epoch); annealing settles it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class DecaySchedule:
    lr: float
    frac: float  # share of max_epochs the decay lasts; 0 = constant rate, no decay
    max_epochs: int
    start: float | None = None  # epochs into training when the decay began
    length: float = 0.0  # epochs it lasts

    @property
    def decaying(self) -> bool:
        return self.start is not None

    def maybe_start(self, epochs_done: int, plateau: bool) -> bool:
        """Called between epochs. Starts the decay at the plateau or when the next epoch would run into the last
        `frac` of max_epochs; returns whether training should go on (False: there is no decay to run and the
        plateau ends training, as plain early stopping)."""
        if self.decaying:
            return True
        if self.frac <= 0:
            return not plateau
        total = float(self.max_epochs)
        left = total - epochs_done
        if plateau or left - 1 < self.frac * total:
            # Whole epochs: a length of 4.5 ended training after 4 with the rate still at a third of its peak.
            self.start, self.length = float(epochs_done), max(min(float(math.ceil(self.frac * total)), left), 1.0)
        return True

    def rate(self, epochs_done: float) -> float:
        """The learning rate now; `epochs_done` may be fractional (steps / steps per epoch)."""
        if not self.decaying:
            return self.lr
        p = (epochs_done - self.start) / self.length
        return self.lr * max(0.0, 1.0 - p)

    def finished(self, epochs_done: int) -> bool:
        """True once another epoch would train at a rate of (almost) zero."""
        return self.decaying and epochs_done + 0.5 >= self.start + self.length
