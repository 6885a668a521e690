"""Mixing schedules for ImitKD: the probability β_t of keeping the data target at step t.

* ``exponential`` (the paper's): β_t = base^(−t/T), from 1 at t = 0 down to 1/base at
  t = T. The authors use base 200 for translation and 10 for CNN/DailyMail; a null
  base takes the task's ``imitation_beta_base`` (``wmt`` 200, ``summarization`` 10).
* ``linear``: β_t = 1 − (1 − final)·t/T, from 1 down to ``final``.
* ``constant``: β_t = ``value`` at every step (``value: 0`` is pure on-policy
  training as in GKD; ``value: 1`` never uses student generations).

t is the 0-based optimiser step and T the total number of steps (``trainer.max_steps``).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


#: Exponential base when neither the config nor the task names one (the authors' translation value).
DEFAULT_BASE = 200.0


class BetaSchedule(BaseModel):
    """β_t: probability that a training sequence keeps its data target."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["exponential", "linear", "constant"] = "exponential"
    base: float | None = Field(
        None, gt=1.0, description="exponential: β_t = base^(-t/T); null: the task's imitation_beta_base (wmt 200, "
                                  "summarization 10), else 200")
    final: float = Field(0.0, ge=0.0, le=1.0, description="linear: β at t = T")
    value: float = Field(1.0, ge=0.0, le=1.0, description="constant: β at every step")

    def beta(self, step: int, total_steps: int) -> float:
        """β at 0-based ``step`` of ``total_steps`` (progress t/T is clamped to [0, 1])."""
        if self.kind == "constant":
            return self.value
        if total_steps <= 0:
            raise ValueError(f"the β schedule needs the total number of training steps (got {total_steps}); "
                             "the engine passes it through Method.on_train_start")
        progress = min(max(step / total_steps, 0.0), 1.0)
        if self.kind == "exponential":
            base = self.base if self.base is not None else DEFAULT_BASE
            return float(base ** (-progress))
        return 1.0 - (1.0 - self.final) * progress

    def for_task(self, task: object) -> "BetaSchedule":
        """This schedule with a null ``base`` filled in from ``task.imitation_beta_base`` (else 200)."""
        if self.base is not None:
            return self
        return self.model_copy(update={"base": float(getattr(task, "imitation_beta_base", DEFAULT_BASE))})


__all__ = ["BetaSchedule", "DEFAULT_BASE"]
