"""pluggy hook specifications (project name ``kd``).

Registration hooks return a list of entries: either classes (with ``name`` and
``description`` class attributes) or :class:`kdcore.registry.LazyEntry` objects
(``module:attribute`` strings, imported only when used). Lifecycle hooks are
called by the trainer on rank 0 with a :class:`kdcore.hooks.RunContext`: they read
``context.state`` (step, metrics, best so far, output directory, ...) and may ask for a
clean stop with ``context.control.request_stop(reason)``; they must not change the
models or the optimiser.

A third-party package exposes a module or object implementing some of these
hooks through the ``kd.plugins`` entry-point group; see docs/writing-plugins.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy

from kdcore.hooks import RunContext

PROJECT_NAME = "kd"
ENTRY_POINT_GROUP = "kd.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class KDHookSpecs:
    """All hooks a kd plugin may implement."""

    # --- registration -----------------------------------------------------
    @hookspec
    def kd_register_methods(self) -> list[Any]:
        """Methods (``kd run --plugin NAME``): ``kdcore.interfaces.Method`` subclasses."""

    @hookspec
    def kd_register_tasks(self) -> list[Any]:
        """Tasks: ``kdcore.interfaces.Task`` subclasses."""

    @hookspec
    def kd_register_objectives(self) -> list[Any]:
        """Objectives: ``kdcore.interfaces.Objective`` subclasses."""

    @hookspec
    def kd_register_teachers(self) -> list[Any]:
        """Teacher factories: ``kdcore.interfaces.ModelFactory`` subclasses."""

    @hookspec
    def kd_register_students(self) -> list[Any]:
        """Student factories: ``kdcore.interfaces.ModelFactory`` subclasses."""

    @hookspec
    def kd_register_trackers(self) -> list[Any]:
        """Experiment trackers (``trainer.report_to: [NAME]``): ``kdcore.tracking.Tracker`` subclasses."""

    # --- lifecycle ----------------------------------------------------------
    @hookspec
    def kd_on_train_start(self, context: RunContext) -> None:
        """Before the first training step (also after a resume)."""

    @hookspec
    def kd_on_step_end(self, context: RunContext, step: int, logs: dict[str, float]) -> None:
        """After each optimiser step; ``logs`` holds the loss and its parts."""

    @hookspec
    def kd_on_log(self, context: RunContext, record: dict[str, Any]) -> None:
        """After the trainer appended ``record`` to log.jsonl: its ``type`` (``train``, ``eval``, ...), its ``step`` and
        its values (the loss and its parts, learning rate and throughput; validation metrics; ...)."""

    @hookspec
    def kd_on_evaluation_end(self, context: RunContext, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation: in the loop (``step`` > 0; ``context.state.last_metrics`` holds the same metrics)
        and the final one on the test split (``step`` = -1)."""

    @hookspec
    def kd_on_checkpoint_saved(self, context: RunContext, step: int, path: Path) -> None:
        """After a checkpoint directory was written completely."""

    @hookspec
    def kd_on_train_end(self, context: RunContext, metrics: dict[str, Any]) -> None:
        """After metrics.json and report.md were written."""
