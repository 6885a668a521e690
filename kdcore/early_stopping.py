"""Early stopping (``trainer.early_stopping``): a lifecycle-hook plugin that stops a run on a plateau.

After each in-loop validation it compares the task's metric (in the task's direction, ``greater_is_better``)
with the best value seen so far; an evaluation that does not beat it by more than ``min_delta`` counts
towards ``patience``, and after ``patience`` of them in a row it asks the trainer for a clean stop through
:class:`kdcore.hooks.RunControl`. Its counter lives in ``RunState.hook_state``, so ``--resume`` continues it.

It lives in kdcore rather than among the plugins because ``trainer.early_stopping`` is a core setting: it must
work whichever plugins are installed. It uses only the public hook API, as a third-party plugin would.
"""
from __future__ import annotations

from typing import Any

from kdcore.hooks import RunContext
from kdcore.hookspecs import hookimpl

#: The key of this plugin's numbers in ``RunState.hook_state`` (saved in checkpoints).
STATE_KEY = "early_stopping"


class EarlyStopping:
    """Asks for a stop after ``patience`` validations in a row without an improvement larger than ``min_delta``."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience = patience
        self.min_delta = min_delta

    @hookimpl
    def kd_on_evaluation_end(self, context: RunContext, step: int, metrics: dict[str, float]) -> None:
        if step < 0:  # the final test evaluation: training is over
            return
        state = context.state
        mine: dict[str, Any] = state.hook_state.setdefault(
            STATE_KEY, {"best": None, "best_step": None, "evaluations_without_improvement": 0})
        value = metrics[state.metric]
        if state.is_better(value, mine["best"], self.min_delta):
            mine.update(best=value, best_step=step, evaluations_without_improvement=0)
            return
        mine["evaluations_without_improvement"] += 1
        if mine["evaluations_without_improvement"] >= self.patience:
            direction = "risen" if state.greater_is_better else "fallen"
            margin = f" by more than {self.min_delta:g}" if self.min_delta else ""
            context.control.request_stop(
                f"early stopping: validation {state.metric} has not {direction}{margin} for {self.patience} "
                f"evaluation(s) since its best, {mine['best']:.6g} at step {mine['best_step']} "
                f"(trainer.early_stopping.patience = {self.patience})")
