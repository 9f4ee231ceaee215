"""The non-finite guard: a step whose loss or gradient is NaN/inf is skipped and counted."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts skipped steps; raises TrainingDiverged after `max_in_a_row` consecutive ones."""

    def __init__(self, max_in_a_row: int = 10, total: int = 0, in_a_row: int = 0):
        self.max_in_a_row = int(max_in_a_row)
        self.total = int(total)
        self.in_a_row = int(in_a_row)

    def update(self, finite: bool, step: int, what: str = "") -> bool:
        """Record one optimizer step; returns `finite`. Raises once the run has clearly diverged."""
        if finite:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"{self.in_a_row} optimizer steps in a row had a non-finite {what or 'loss or gradient'} "
                f"(last at step {step}); stopping. Try a lower --lr, --precision fp32 or a --clip-norm"
            )
        return False

    def state_dict(self) -> dict:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.total = int(state["total"])
        self.in_a_row = int(state["in_a_row"])
