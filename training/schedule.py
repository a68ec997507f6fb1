"""Learning rate over a fit: constant, then a linear decay to zero over the last part of training
(warmup-free "warmup-stable-decay").

Training here stops on a wall-clock budget or on a validation plateau, so the end is not known in epochs
up front. The decay therefore starts at whichever comes first: the point where only `frac` of the budget
(or of max_epochs, with no budget) is left, or the plateau (patience used up), and then runs over `frac`
of the budget (never past it). With a constant rate, small-batch training kept bouncing around a level
(ml1m ranker validation HR@10 moved +-0.02 from epoch to epoch); annealing at the end settles it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecaySchedule:
    lr: float
    frac: float  # share of the budget (or of max_epochs) the decay lasts; 0 = constant rate, no decay
    budget_s: float  # wall-clock budget (0 = none: the decay is counted in epochs)
    max_epochs: int
    start: float | None = None  # seconds (budget) or epochs (no budget) into training when decay began
    length: float = 0.0  # same unit

    @property
    def decaying(self) -> bool:
        return self.start is not None

    def _unit(self, elapsed_s: float, epochs_done: float) -> float:
        return elapsed_s if self.budget_s else epochs_done

    def _total(self) -> float:
        return self.budget_s if self.budget_s else float(self.max_epochs)

    def maybe_start(self, elapsed_s: float, epochs_done: int, epoch_cost_s: float, plateau: bool) -> bool:
        """Called between epochs. Starts the decay when the plateau is reached or when the next epoch would
        run into the last `frac` of the budget; returns whether training should go on (False: there is no
        decay to run and the plateau ends training, as plain early stopping)."""
        if self.decaying:
            return True
        if self.frac <= 0:
            return not plateau
        now = self._unit(elapsed_s, epochs_done)
        next_cost = epoch_cost_s if self.budget_s else 1.0
        left = self._total() - now
        if plateau or left - next_cost < self.frac * self._total():
            self.start, self.length = now, max(min(self.frac * self._total(), left), next_cost)
        return True

    def rate(self, elapsed_s: float, epochs_done: float) -> float:
        """The learning rate now; `epochs_done` may be fractional (steps / steps per epoch)."""
        if not self.decaying:
            return self.lr
        p = (self._unit(elapsed_s, epochs_done) - self.start) / self.length
        return self.lr * max(0.0, 1.0 - p)

    def finished(self, elapsed_s: float, epochs_done: int, epoch_cost_s: float) -> bool:
        """True once another epoch would train at a rate of (almost) zero."""
        if not self.decaying:
            return False
        next_cost = epoch_cost_s if self.budget_s else 1.0
        return self._unit(elapsed_s, epochs_done) + next_cost / 2 >= self.start + self.length
