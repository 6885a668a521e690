"""A wall-clock budget for a training loop: fewer steps on a slower machine instead of a blown time limit.

kd's default runs promise a time limit on 2 CPU cores, but the CPUs they run on differ about 2× in speed (and
bf16 is fast only where the CPU has bf16 units). With ``trainer.time_budget_minutes`` (``teacher.args.
time_budget_minutes`` for a task-trained teacher) the engine times the first steps, projects the whole loop (the
remaining steps at the measured rate, plus the validations still to come at the measured cost of one) and, when
the projection is over the budget, lowers ``max_steps`` to the most steps that fit. It checks again after every
validation (the first one gives its cost) and every :data:`RECHECK_STEPS` steps (a teacher stage validates nothing),
at the rate of the later half of the steps so far, because the cost of a step drifts: the first epoch of a speech run
also computes the teacher's states that later epochs read from its cache, and ImitKD's rollouts grow as β decays. A
check may therefore also raise a lowered plan again: never above the configured ``max_steps``, only by at least
:data:`RAISE_MARGIN` (so timing noise does not move the schedules at every check) and only in the first half of the
plan (where it does not re-open a learning-rate decay that has nearly ended). The learning-rate schedule follows the
new ``max_steps``, so a shortened run still ends its decay. Every change is logged (a ``budget`` record in
log.jsonl, a warning naming the measured rates) and reported in metrics.json and report.md; the plan is saved in
each checkpoint, so ``--resume`` continues it.

A budget makes the number of steps depend on the machine, so two machines may train different students from the
same config; runs that must be identical across machines leave it unset (the default for every non-default
config).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

#: Steps timed before the first projection; the very first steps (allocation, warm caches) are not timed.
CALIBRATION_STEPS = 20
UNTIMED_STEPS = 3
#: A check raises a lowered plan only when this share more steps fit (each change bends the schedules).
RAISE_MARGIN = 0.05
#: Steps between two checks where no validation comes first.
RECHECK_STEPS = 100


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
    validations: int = 0
    validation_seconds: float = 0.0
    calibrated: bool = False
    step_times: list[float] = field(default_factory=list)
    since_check: int = 0

    @property
    def timed_steps(self) -> int:
        return len(self.step_times)

    def record_step(self, step_index: int, seconds: float) -> None:
        """A training step took ``seconds`` (``step_index`` counts this process's steps from 0)."""
        if step_index >= UNTIMED_STEPS:
            self.step_times.append(seconds)
            self.since_check += 1

    def seconds_per_step(self) -> float:
        """The latest rate: the mean of the later half of the timed steps (at least :data:`CALIBRATION_STEPS`), which
        leaves a slow start behind and follows a drift, while a longer run averages over more steps, so the noise of a
        short window does not move the plan up and down."""
        latest = self.step_times[-max(CALIBRATION_STEPS, len(self.step_times) // 2):]
        return sum(latest) / len(latest)

    def record_validation(self, seconds: float) -> None:
        """A validation took ``seconds``."""
        self.validations += 1
        self.validation_seconds += seconds

    def due(self, after_validation: bool) -> bool:
        """Whether to project now: once calibrated by :data:`CALIBRATION_STEPS` timed steps, then after validations
        and after every :data:`RECHECK_STEPS` timed steps since the previous check."""
        if not self.calibrated:
            if self.timed_steps >= CALIBRATION_STEPS:
                self.calibrated = True
                return True
            return False
        return after_validation or self.since_check >= RECHECK_STEPS

    def plan(self, *, done: int, planned: int, elapsed: float, ceiling: int | None = None) -> tuple[int, str] | None:
        """A new total of steps and its reason when the projection says the plan should change, else None.

        Lower when ``planned`` steps are projected over the budget; higher, up to ``ceiling`` (the configured
        ``max_steps``; None: ``planned``), when at least :data:`RAISE_MARGIN` more steps fit at the latest rate and
        less than half of ``planned`` is done.
        """
        if not self.timed_steps:
            return None
        ceiling = planned if ceiling is None else max(ceiling, planned)
        per_step = self.seconds_per_step()
        self.since_check = 0
        per_validation = self.validation_seconds / self.validations if self.validations else 0.0
        fitting = steps_that_fit(done=done, planned=ceiling, elapsed=elapsed, budget=self.budget_seconds,
                                 seconds_per_step=per_step, seconds_per_validation=per_validation,
                                 eval_every=self.eval_every)
        if planned > fitting:
            total = planned
        elif planned < ceiling and fitting >= planned * (1.0 + RAISE_MARGIN) and done < planned / 2:
            total = ceiling
        else:
            return None
        projection = projected_seconds(done=done, total=total, elapsed=elapsed, seconds_per_step=per_step,
                                       seconds_per_validation=per_validation, eval_every=self.eval_every)
        validations = (f" and {per_validation:.1f} s per validation" if self.validations else
                       " (no validation timed yet)")
        verdict = "over" if projection > self.budget_seconds else "within"
        reason = (f"projected {_minutes(projection)} for {total} steps at {per_step:.3f} s per step{validations}, "
                  f"{verdict} the time budget of {_minutes(self.budget_seconds)}; {fitting} steps fit")
        return fitting, reason


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if math.isfinite(seconds) else "inf"


__all__ = ["BudgetPlanner", "CALIBRATION_STEPS", "RAISE_MARGIN", "RECHECK_STEPS", "projected_seconds", "steps_that_fit",
           "validations_between"]
