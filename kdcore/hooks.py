"""What lifecycle hooks see of a run and how they act on it: :class:`RunState`, :class:`RunControl`, :class:`RunContext`.

The trainer fills the state and reads the control; a hook reads the state and may ask for a stop through the
control. This module is the whole contract between them: it imports nothing from the rest of kd, so a plugin
(and :mod:`kdcore.hookspecs`) can import it without pulling in the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunState:
    """Where a training run stands; updated by the trainer before each hook call.

    The fields below ``max_steps`` are saved in every checkpoint and restored by ``--resume``; ``hook_state`` is
    where a hook keeps its own numbers (JSON values under a key of its own, e.g. a patience counter) so that they
    survive a resume too.
    """

    out_dir: Path
    task: str
    plugin: str
    metric: str
    greater_is_better: bool
    max_steps: int
    step: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)
    best_metric: float | None = None
    best_step: int | None = None
    train_seconds: float = 0.0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0
    stop_reason: str | None = None
    stopped_at_step: int | None = None
    #: Set when ``trainer.time_budget_minutes`` lowered ``max_steps``: planned_steps, max_steps, budget, reason.
    time_budget: dict[str, Any] | None = None
    hook_state: dict[str, Any] = field(default_factory=dict)

    #: The fields a checkpoint stores (the others are fixed by the config or are the checkpoint's own step).
    SAVED = ("last_metrics", "best_metric", "best_step", "train_seconds", "nonfinite_steps", "consecutive_nonfinite",
             "stop_reason", "stopped_at_step", "time_budget", "hook_state")

    def saved_fields(self) -> dict[str, Any]:
        """The checkpointed fields as JSON values."""
        return {name: getattr(self, name) for name in self.SAVED}

    def restore(self, saved: dict[str, Any]) -> None:
        """Take the checkpointed fields from ``saved``; a field missing there (an older checkpoint) keeps its value."""
        for name in self.SAVED:
            if name in saved:
                setattr(self, name, saved[name])

    def is_better(self, value: float, than: float | None, min_delta: float = 0.0) -> bool:
        """Whether ``value`` beats ``than`` on the task's metric by more than ``min_delta`` (None: anything beats it)."""
        if than is None:
            return True
        return value - than > min_delta if self.greater_is_better else than - value > min_delta


@dataclass
class RunControl:
    """What hooks ask of the trainer. A stop request ends the run cleanly after the current step.

    A clean stop writes a checkpoint, keeps the best student, produces metrics.json and report.md and exits 0;
    log.jsonl, metrics.json and report.md name the reason. A stop requested at the last step changes nothing.
    """

    stop_reason: str | None = None

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def request_stop(self, reason: str) -> None:
        """Ask the trainer to stop after this step; ``reason`` is shown to the user. The first request wins."""
        if self.stop_reason is None:
            self.stop_reason = reason


@dataclass
class RunContext:
    """The ``context`` argument of every lifecycle hook.

    ``components`` are the run's built parts (a :class:`kdcore.resolve.BuiltRun`: task, teacher, student, method,
    device; typed loosely so that this module imports no implementation). Hooks run on rank 0 only.
    """

    state: RunState
    control: RunControl
    components: Any
    config: Any  # the validated kdcore.config.RunConfig

    @property
    def out_dir(self) -> Path:
        return self.state.out_dir
