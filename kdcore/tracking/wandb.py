"""Weights & Biases (``trainer.report_to: [wandb]``): offline by default, in ``<out>/wandb``.

Nothing leaves the machine unless the user asks W&B to: without ``WANDB_MODE`` in the environment the run is
recorded offline (upload it later with ``wandb sync <out>/wandb/offline-run-*``); ``WANDB_MODE=online`` (after
``wandb login``) streams it live. W&B's own ``WANDB_PROJECT`` (default ``kd``), ``WANDB_ENTITY`` and the other
``WANDB_*`` settings apply. The resolved config is the run's config; report.md's figures are logged as images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdcore.hooks import RunContext
from kdcore.tracking.base import Tracker, resolved_config

DEFAULT_PROJECT = "kd"


class WandbTracker(Tracker):
    """Records the run's scalars, config and figures in a W&B run (offline unless WANDB_MODE says otherwise)."""

    name = "wandb"
    description = "Weights & Biases run in <out>/wandb, offline unless WANDB_MODE is set: log.jsonl's scalars, config, figures"
    modules = ("wandb",)
    extra = "wandb"

    def __init__(self) -> None:
        super().__init__()
        self.run: Any = None

    def start(self, context: RunContext, resumed_at: int | None) -> None:
        import wandb

        saved = self.saved(context)
        resume_id = saved.get("run_id") if resumed_at is not None else None
        self.run = wandb.init(
            dir=str(context.out_dir), project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=context.out_dir.name, config=resolved_config(context),
            mode=os.environ.get("WANDB_MODE") or "offline",
            id=resume_id, resume="allow" if resume_id else None)
        saved["run_id"] = self.run.id

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_figures(self, figures: dict[str, Path], step: int) -> None:
        import wandb

        self.run.log({f"figures/{name}": wandb.Image(str(path)) for name, path in figures.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()
        self.run = None
