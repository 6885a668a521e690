"""Trackio (``trainer.report_to: [trackio]``): a local run in trackio's own directory, offline unless configured.

Trackio keeps every project in one local SQLite database per project under ``$TRACKIO_DIR`` (default
``~/.cache/huggingface/trackio``), which its dashboard (``trackio show --project kd``) reads; it sends nothing
anywhere unless the user points it at a Hugging Face Space or a server (``TRACKIO_SPACE_ID``,
``TRACKIO_SERVER_URL``). Trackio reads ``TRACKIO_DIR`` once, when it is first imported, so the directory cannot be
chosen per run: runs go to project ``kd`` under the name of their output directory. The resolved config is the
run's config; report.md's figures are logged as images; trackio's own CPU/GPU monitors stay off (the scalars are
log.jsonl's).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcore.hooks import RunContext
from kdcore.tracking.base import Tracker, resolved_config

PROJECT = "kd"


class TrackioTracker(Tracker):
    """Records the run's scalars, config and figures in a local trackio run (project ``kd``)."""

    name = "trackio"
    description = "Trackio run in $TRACKIO_DIR (project kd), local unless a Space/server is configured: scalars, config, figures"
    modules = ("trackio",)
    extra = "trackio"

    def __init__(self) -> None:
        super().__init__()
        self.run: Any = None

    def start(self, context: RunContext, resumed_at: int | None) -> None:
        import trackio

        saved = self.saved(context)
        name = saved.get("run_name") if resumed_at is not None else None
        # A resume continues the latest trackio run of the saved name; a fresh run is new even if the name exists.
        self.run = trackio.init(project=PROJECT, name=name or context.out_dir.name, config=resolved_config(context),
                                resume="allow" if name else "never", embed=False, auto_log_cpu=False,
                                auto_log_gpu=False)
        saved["run_name"] = self.run.name

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def log_figures(self, figures: dict[str, Path], step: int) -> None:
        import trackio

        self.run.log({f"figures/{name}": trackio.Image(str(path)) for name, path in figures.items()}, step=step)

    def finish(self) -> None:
        self.run.finish()
        self.run = None
