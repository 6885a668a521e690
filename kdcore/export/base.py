"""What an exporter is: one kind of kd student turned into files other tools load.

An :class:`Exporter` says which students it takes (:meth:`Exporter.fits`), which
formats it writes (:attr:`Exporter.formats`, the first is the default), why a
particular student cannot take a format (:meth:`Exporter.refusal`), and writes one
format into a directory, checking what it wrote against the kd student
(:meth:`Exporter.write` returns an :class:`ExportResult` with the self-test's
numbers). The built-in exporters are named in :data:`BUILTIN_EXPORTERS` as
``module:attribute`` strings, imported only when ``kd export`` runs.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kdcore.interfaces import DataSplits, Student
from kdcore.resolve import BuiltRun

#: The exporters kd ships, tried in order; the first whose ``fits`` accepts the student is used.
BUILTIN_EXPORTERS: tuple[str, ...] = (
    "kd_plugins.text.export:TextStudentExporter",
    "kd_plugins.speech.export:DistilHubertExporter",
    "kd_plugins.speech.export:GenDistillerExporter",
)


@dataclass
class ExportResult:
    """What one format's export wrote and how it was checked.

    ``library_name`` goes into the model card header (``transformers``, ``onnx``, ``kd``);
    ``checks`` holds the self-test's measured values (differences to the kd student,
    tolerances, outputs compared); ``usage`` is a Markdown section with the loading code
    (``EXPORT_DIR`` stands for the export's directory).
    """

    library_name: str
    files: list[str]
    checks: dict[str, Any]
    usage: str
    pipeline_tag: str | None = None
    tags: list[str] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=dict)


class Exporter(abc.ABC):
    """Writes one kind of student in the formats it knows (subclasses)."""

    #: format name -> one-line description; the first is the default of ``kd export``.
    formats: ClassVar[dict[str, str]]

    def __init__(self, built: BuiltRun, splits: DataSplits) -> None:
        self.built = built
        self.splits = splits

    @classmethod
    @abc.abstractmethod
    def fits(cls, student: Student) -> bool:
        """Whether this exporter knows ``student``'s architecture."""

    def refusal(self, fmt: str) -> str | None:  # noqa: ARG002 - most students take every format they list
        """Why this particular student cannot be written as ``fmt`` (None: it can)."""
        return None

    @abc.abstractmethod
    def write(self, fmt: str, directory: Path) -> ExportResult:
        """Write ``fmt`` into the (empty) ``directory`` and check it against the kd student."""

    def describe_student(self) -> str:
        """One line about the student's architecture for the model card."""
        return type(self.built.student).__name__


__all__ = ["BUILTIN_EXPORTERS", "ExportResult", "Exporter"]
