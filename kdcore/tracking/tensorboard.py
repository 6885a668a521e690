"""TensorBoard (``trainer.report_to: [tensorboard]``): event files in ``<out>/tensorboard``.

View them with ``tensorboard --logdir <out>/tensorboard`` (or a parent folder, to compare runs). The resolved
config goes to the HParams dashboard and, as YAML, to the Text dashboard; report.md's figures to Images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdcore.hooks import RunContext
from kdcore.tracking.base import Tracker, flat_hyperparameters, resolved_config

#: The folder under the run's output directory that holds the event files.
LOG_DIR = "tensorboard"


class TensorBoardTracker(Tracker):
    """Writes the run's scalars, config and figures as TensorBoard event files under ``<out>/tensorboard``."""

    name = "tensorboard"
    description = "TensorBoard event files in <out>/tensorboard: log.jsonl's scalars, the config as HParams, report figures"
    modules = ("tensorboard",)
    extra = "tensorboard"

    def __init__(self) -> None:
        super().__init__()
        self.writer: Any = None
        self._session_end: Any = None

    def start(self, context: RunContext, resumed_at: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # On a resume, TensorBoard drops the events after the checkpoint's step: those steps are trained again (and
        # log.jsonl loses their records too).
        self.writer = SummaryWriter(log_dir=str(context.out_dir / LOG_DIR),
                                    purge_step=None if resumed_at is None else resumed_at + 1)
        config = resolved_config(context)
        metric = context.state.metric
        experiment, session_start, self._session_end = hparams(
            flat_hyperparameters(config), {f"valid/{metric}": None, f"test/{metric}": None})
        for summary in (experiment, session_start):
            self.writer.file_writer.add_summary(summary)
        # Indented: TensorBoard renders text as Markdown, and an indented block keeps the YAML as it is.
        text = "\n".join("    " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines())
        self.writer.add_text("config", text, global_step=resumed_at or 0)
        self.writer.flush()

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # a crash loses nothing already logged

    def log_figures(self, figures: dict[str, Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for name, path in figures.items():
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"figures/{name}", pixels, global_step=step, dataformats="HWC")

    def finish(self) -> None:
        self.writer.file_writer.add_summary(self._session_end)
        self.writer.close()
        self.writer = None
