"""Mixing schedules for ImitKD: the probability β_t of keeping the data target at step t.

* ``exponential`` (the paper's): β_t = base^(−t/T), from 1 at t = 0 down to 1/base at
  t = T. The authors use base 200 for translation and 10 for CNN/DailyMail; a null
  base takes the task's ``imitation_beta_base`` (``wmt`` 200, ``summarization`` 10).
* ``linear``: β_t = 1 − (1 − final)·t/T, from 1 down to ``final``.
* ``constant``: β_t = ``value`` at every step (``value: 0`` is pure on-policy
  training as in GKD; ``value: 1`` never uses student generations).
* ``adaptive`` (DistiLLM's adaptive off-policy approach, Ko et al. 2024): the
  student fraction 1 − β starts at ``initial`` and is raised by ``step`` (at most
  to ``max``) after each validation whose watched value is worse than the
  reference by more than ``tolerance``. The reference is the previous validation
  (``compare_with: previous``) or the validation of the last raise
  (``compare_with: last_raise``, the authors' code). The run's state is an
  :class:`AdaptiveFraction`, which the method feeds (``Method.on_validation``) and
  checkpoints.

``warmup`` (every kind but adaptive): β_t = 1 (data targets only) while t/T < warmup,
the kind's formula afterwards. The LLM presets pair it with a supervised
objective active during the same span: GKD, DistiLLM and MiniLLM start from a
student fine-tuned on the data, which kd makes the first part of the run.

t is the 0-based optimiser step and T the total number of steps (``trainer.max_steps``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator


#: Exponential base when neither the config nor the task names one (the authors' translation value).
DEFAULT_BASE = 200.0
#: The options only the adaptive schedule reads.
ADAPTIVE_FIELDS = ("initial", "step", "max", "metric", "greater_is_better", "tolerance", "compare_with")


class BetaSchedule(BaseModel):
    """β_t: probability that a training sequence keeps its data target."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["exponential", "linear", "constant", "adaptive"] = "exponential"
    base: float | None = Field(
        None, gt=1.0, description="exponential: β_t = base^(-t/T); null: the task's imitation_beta_base (wmt 200, "
                                  "summarization 10), else 200")
    final: float = Field(0.0, ge=0.0, le=1.0, description="linear: β at t = T")
    value: float = Field(1.0, ge=0.0, le=1.0, description="constant: β at every step")
    initial: float = Field(0.0, ge=0.0, le=1.0, description="adaptive: student fraction 1 - β before any raise")
    step: float = Field(0.1, gt=0.0, le=1.0, description="adaptive: added to the student fraction after a worse "
                                                         "validation")
    max: float = Field(1.0, ge=0.0, le=1.0, description="adaptive: the student fraction is never raised above it")
    metric: str | None = Field(
        None, description="adaptive: the validation metric watched; null: the run's selection metric (the task's "
                          "'metric', with the task's direction)")
    greater_is_better: bool | None = Field(
        None, description="adaptive: the watched metric's direction; null: the task's (needed when 'metric' names "
                          "another metric than the task's selection metric)")
    tolerance: float = Field(0.0, ge=0.0, description="adaptive: how much worse than the reference (in the metric's "
                                                      "units) a validation must be to raise the fraction")
    warmup: float = Field(0.0, ge=0.0, lt=1.0, description="β = 1 (data targets only, no generation) while t/T < "
                                                             "warmup; the kind's formula afterwards (not adaptive)")
    compare_with: Literal["previous", "last_raise"] = Field(
        "previous", description="adaptive: the reference a validation is compared with: the previous validation, or "
                                "the validation at the last raise (the first validation until then; DistiLLM's code)")

    @model_validator(mode="after")
    def _adaptive_options(self) -> "BetaSchedule":
        # Keys set to something other than their default: a run's saved config.yaml writes every key, defaults too.
        adaptive_keys = sorted(key for key in self.model_fields_set & set(ADAPTIVE_FIELDS)
                               if getattr(self, key) != type(self).model_fields[key].get_default(call_default_factory=True))
        if self.kind != "adaptive" and adaptive_keys:
            raise ValueError(f"{', '.join(adaptive_keys)} configure the adaptive schedule, but kind is "
                             f"'{self.kind}'; set kind: adaptive, or remove them.")
        if self.kind == "adaptive" and self.warmup > 0:
            raise ValueError(f"warmup = {self.warmup:g} keeps the data targets for the first part of the run, but "
                             f"the adaptive schedule sets the student fraction itself (it starts at initial = "
                             f"{self.initial:g}); remove warmup (initial: 0 starts on the data targets only), or use another kind.")
        if self.kind == "adaptive" and self.initial > self.max:
            raise ValueError(f"the adaptive schedule starts at initial = {self.initial:g} but may rise only to "
                             f"max = {self.max:g}; set initial <= max.")
        return self

    def beta(self, step: int, total_steps: int, adaptive: "AdaptiveFraction | None" = None) -> float:
        """β at 0-based ``step`` of ``total_steps`` (progress t/T is clamped to [0, 1]).

        The adaptive schedule reads its run state ``adaptive`` (its ``initial`` fraction when None).
        """
        if self.kind == "adaptive":
            return 1.0 - (adaptive.fraction if adaptive is not None else self.initial)
        if self.warmup > 0 and (total_steps <= 0 or step / total_steps < self.warmup):
            if total_steps <= 0:
                raise ValueError(f"the β schedule's warmup needs the total number of training steps (got "
                                 f"{total_steps}); the engine passes it through Method.on_train_start")
            return 1.0
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


@dataclass
class AdaptiveFraction:
    """The run state of an ``adaptive`` schedule: the student fraction and the validation it is compared with."""

    fraction: float
    reference: float | None = None  # the watched value of the reference validation (None before the first)
    raises: int = 0

    @classmethod
    def start(cls, schedule: BetaSchedule) -> "AdaptiveFraction":
        """The state before any validation."""
        return cls(fraction=schedule.initial)

    def observe(self, value: float, schedule: BetaSchedule, greater_is_better: bool) -> bool:
        """Feed one validation's watched ``value``; True when it raised the fraction."""
        if not math.isfinite(value):  # a NaN is not evidence either way; the reference stays
            return False
        worse = False
        if self.reference is not None:
            change = self.reference - value if greater_is_better else value - self.reference
            worse = change > schedule.tolerance
        raised = worse and self.fraction < schedule.max
        if raised:
            # round(): ten steps of 0.1 reach 1.0 rather than 0.9999999999999999
            self.fraction = min(schedule.max, round(self.fraction + schedule.step, 12))
            self.raises += 1
        if self.reference is None or schedule.compare_with == "previous" or worse:
            self.reference = value
        return raised

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state for a checkpoint."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "AdaptiveFraction":
        """The state :meth:`state_dict` saved."""
        reference = state.get("reference")
        return cls(fraction=float(state["fraction"]), reference=None if reference is None else float(reference),
                   raises=int(state.get("raises", 0)))


__all__ = ["AdaptiveFraction", "BetaSchedule", "DEFAULT_BASE"]
