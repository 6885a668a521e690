"""A wall-clock budget for a training loop: fewer steps on a slower machine instead of a blown time limit.

kd's default runs promise a time limit on 2 CPU cores, but the CPUs they run on differ about 2× in speed (and
bf16 is fast only where the CPU has bf16 units). With ``trainer.time_budget_minutes`` (``teacher.args.
time_budget_minutes`` for a task-trained teacher) the engine times the first steps, projects the whole loop (the
remaining steps at the measured rate, plus the validations still to come at the measured cost of one) and, when
the projection is over the budget, lowers ``max_steps`` to the most steps that fit. It checks again after every
validation (the first one gives its cost) and only ever lowers the plan. The learning-rate schedule follows the
new ``max_steps``, so a shortened run still ends its decay. Every change is logged (a ``budget`` record in
log.jsonl, a warning naming the measured rates) and reported in metrics.json and report.md; the plan is saved in
each checkpoint, so ``--resume`` continues it.

A budget makes the number of steps depend on the machine, so two machines may train different students from the
same config; runs that must be identical across machines leave it unset (the default for every non-default
config).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: Steps timed before the first projection; the very first steps (allocation, warm caches) are not timed.
CALIBRATION_STEPS = 20
UNTIMED_STEPS = 3


def validations_between(done: int, total: int, eval_every: int | None) -> int:
    """Validations the loop still runs after step ``done`` up to ``total``: at multiples of ``eval_every`` and at
    ``total`` itself (``eval_every`` None: the loop runs none)."""
    if eval_every is None or total <= done:
        return 0
    count = total // eval_every - done // eval_every
    return count + (0 if total % eval_every == 0 else 1)


def projected_seconds(*, done: int, total: int, elapsed: float, seconds_per_step: float,
                      seconds_per_validation: float, eval_every: int | None) -> float:
    """Wall-clock seconds of a loop of ``total`` steps, ``elapsed`` of which are spent after ``done`` steps."""
    return (elapsed + (total - done) * seconds_per_step
            + validations_between(done, total, eval_every) * seconds_per_validation)


def steps_that_fit(*, done: int, planned: int, elapsed: float, budget: float, seconds_per_step: float,
                   seconds_per_validation: float, eval_every: int | None) -> int:
    """The largest total number of steps (at most ``planned``, at least ``done + 1``) whose projected end is
    within ``budget`` seconds, given ``elapsed`` seconds already spent after ``done`` steps."""

    def projected(total: int) -> float:
        return projected_seconds(done=done, total=total, elapsed=elapsed, seconds_per_step=seconds_per_step,
                                 seconds_per_validation=seconds_per_validation, eval_every=eval_every)

    if projected(planned) <= budget:
        return planned
    low, high = done + 1, planned  # projected() grows with total: bisect for the last total that fits
    if projected(low) > budget:
        return low
    while low < high:
        middle = (low + high + 1) // 2
        if projected(middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass
class BudgetPlanner:
    """The trainer's budget bookkeeping for one process: step and validation timings, and when to re-plan."""

    budget_seconds: float
    eval_every: int | None
    first_timed_step: int = 0
    timed_steps: int = 0
    step_seconds: float = 0.0
    validations: int = 0
    validation_seconds: float = 0.0
    calibrated: bool = False

    def record_step(self, step_index: int, seconds: float) -> None:
        """A training step took ``seconds`` (``step_index`` counts this process's steps from 0)."""
        if step_index >= UNTIMED_STEPS:
            self.timed_steps += 1
            self.step_seconds += seconds

    def record_validation(self, seconds: float) -> None:
        """A validation took ``seconds``."""
        self.validations += 1
        self.validation_seconds += seconds

    def due(self, after_validation: bool) -> bool:
        """Whether to project now: once calibrated by :data:`CALIBRATION_STEPS` timed steps, then after validations."""
        if not self.calibrated:
            if self.timed_steps >= CALIBRATION_STEPS:
                self.calibrated = True
                return True
            return False
        return after_validation

    def plan(self, *, done: int, planned: int, elapsed: float) -> tuple[int, str] | None:
        """A lower step count and its reason when the projection of ``planned`` steps is over budget, else None."""
        if not self.timed_steps:
            return None
        per_step = self.step_seconds / self.timed_steps
        per_validation = self.validation_seconds / self.validations if self.validations else 0.0
        fitting = steps_that_fit(done=done, planned=planned, elapsed=elapsed, budget=self.budget_seconds,
                                 seconds_per_step=per_step, seconds_per_validation=per_validation,
                                 eval_every=self.eval_every)
        if fitting >= planned:
            return None
        projection = projected_seconds(done=done, total=planned, elapsed=elapsed, seconds_per_step=per_step,
                                       seconds_per_validation=per_validation, eval_every=self.eval_every)
        validations = (f" and {per_validation:.1f} s per validation" if self.validations else
                       " (no validation timed yet)")
        reason = (f"projected {_minutes(projection)} for {planned} steps at {per_step:.3f} s per step{validations}, "
                  f"over the time budget of {_minutes(self.budget_seconds)}; {fitting} steps fit")
        return fitting, reason


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if math.isfinite(seconds) else "inf"


__all__ = ["BudgetPlanner", "CALIBRATION_STEPS", "projected_seconds", "steps_that_fit", "validations_between"]
