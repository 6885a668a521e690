"""The base of every experiment tracker: what a run sends to a tracker, derived once from the public hooks.

A tracker receives

* the **scalars of log.jsonl**, as they are written (:meth:`KDHookSpecs.kd_on_log`): every number of a record
  except its step, named ``<split or type>/<field>`` (``train/loss``, ``train/lr``, ``train/examples_per_second``,
  ``valid/accuracy``, ...) at the record's step;
* the **resolved config** (what ``<out>/config.yaml`` holds) as hyper-parameters when it opens;
* at the end (:meth:`KDHookSpecs.kd_on_train_end`), the **test metrics** of metrics.json (``test/<metric>`` for the
  student, ``test_teacher/<metric>`` for the teacher) and the **figures of report.md** (the images it links).

A subclass implements :meth:`Tracker.start`, :meth:`Tracker.log_scalars`, :meth:`Tracker.log_figures` and
:meth:`Tracker.finish` with its library's calls and names that library in ``modules``; planning refuses a run
whose tracker's modules are missing, naming ``pip install "kd[<extra>]"``. Hooks run on rank 0 only, so under
torchrun only rank 0 reports.
"""
from __future__ import annotations

import abc
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, ClassVar

from kdcore.errors import KDUserError
from kdcore.hooks import RunContext
from kdcore.hookspecs import hookimpl

Hyperparameter = str | int | float | bool

#: A figure in report.md: ``![alt text](file.png)``.
_FIGURE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of one log.jsonl record (its step excepted), named ``<split or type>/<field>``."""
    group = record.get("split") or record["type"]
    return {f"{group}/{key}": float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The test-split numbers of metrics.json: the student's as ``test/<metric>``, the teacher's as ``test_teacher/``."""
    scalars: dict[str, float] = {}
    for group, role in (("test", "student"), ("test_teacher", "teacher")):
        scalars.update({f"{group}/{key}": float(value) for key, value in (metrics.get(role) or {}).items()
                        if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return scalars


def report_figures(out_dir: Path) -> dict[str, Path]:
    """The images report.md links to, by file stem (``loss``, ``metric``), in the report's order."""
    report = Path(out_dir) / "report.md"
    if not report.is_file():
        return {}
    figures = {}
    for link in _FIGURE_LINK.findall(report.read_text(encoding="utf-8")):
        path = Path(out_dir) / link
        if path.is_file():
            figures[path.stem] = path
    return figures


def flat_hyperparameters(config: dict[str, Any], prefix: str = "") -> dict[str, Hyperparameter]:
    """A nested config as ``dotted.key -> value``; lists and nulls as their JSON text (trackers take scalars only)."""
    flat: dict[str, Hyperparameter] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_hyperparameters(value, f"{name}."))
        elif isinstance(value, (str, int, float, bool)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def resolved_config(context: RunContext) -> dict[str, Any]:
    """The run's fully resolved config (defaults filled in), as config.yaml holds it."""
    return context.components.resolved.to_dict()


class Tracker(abc.ABC):
    """An experiment tracker named in ``trainer.report_to``: a lifecycle-hook plugin, one instance per run.

    Subclasses set ``name``, ``description``, ``modules`` (the importable packages the tracker needs) and ``extra``
    (the ``kd[...]`` extra that installs them), and implement :meth:`start`, :meth:`log_scalars`,
    :meth:`log_figures` and :meth:`finish`. They import their library inside those methods, never at module level.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    modules: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = ""

    def __init__(self) -> None:
        self._open = False

    # ------------------------------------------------------------------ installation
    @classmethod
    def install_command(cls) -> str:
        """The pip command that installs what this tracker needs."""
        return f'pip install "kd[{cls.extra}]"'

    @classmethod
    def check_installed(cls) -> None:
        """Refuse (exit 2) when a module the tracker needs cannot be imported, naming the pip command."""
        missing = [module for module in cls.modules if importlib.util.find_spec(module) is None]
        if missing:
            raise KDUserError(
                f"trainer.report_to names '{cls.name}', which needs the Python package(s) {', '.join(missing)}, not "
                f"installed here. Install them with: {cls.install_command()} (or remove '{cls.name}' from "
                f"trainer.report_to).")

    # ------------------------------------------------------------------ what a tracker implements
    @abc.abstractmethod
    def start(self, context: RunContext, resumed_at: int | None) -> None:
        """Open the tracker's run and record the resolved config; ``resumed_at`` is the step a ``--resume``
        continues from (None for a fresh run). Values kept in :meth:`saved` survive the resume."""

    @abc.abstractmethod
    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Record ``scalars`` at ``step``."""

    @abc.abstractmethod
    def log_figures(self, figures: dict[str, Path], step: int) -> None:
        """Record the report's figures (PNG files, by name) at ``step``."""

    @abc.abstractmethod
    def finish(self) -> None:
        """Mark the run complete and release the tracker's files."""

    def saved(self, context: RunContext) -> dict[str, Any]:
        """This tracker's entry in ``RunState.hook_state`` (JSON values, saved in checkpoints: e.g. a run id)."""
        return context.state.hook_state.setdefault(f"tracker.{self.name}", {})

    # ------------------------------------------------------------------ the hooks
    def _ensure_open(self, context: RunContext) -> None:
        # A fresh run's first hook is the log's start record; a resumed run's is kd_on_train_start.
        if not self._open:
            self.start(context, context.state.step or None)
            self._open = True

    @hookimpl
    def kd_on_train_start(self, context: RunContext) -> None:
        self._ensure_open(context)

    @hookimpl
    def kd_on_log(self, context: RunContext, record: dict[str, Any]) -> None:
        self._ensure_open(context)
        scalars = scalars_of(record)
        if scalars:
            self.log_scalars(scalars, int(record["step"]))

    @hookimpl
    def kd_on_train_end(self, context: RunContext, metrics: dict[str, Any]) -> None:
        self._ensure_open(context)
        step = context.state.step
        scalars = final_scalars(metrics)
        if scalars:
            self.log_scalars(scalars, step)
        figures = report_figures(context.out_dir)
        if figures:
            self.log_figures(figures, step)
        self.finish()
        self._open = False
