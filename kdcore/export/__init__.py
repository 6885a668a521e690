"""``kd export``: a finished run's student as files other tools load, with a model card.

:func:`~kdcore.export.run.export_run` picks the student's exporter
(:mod:`kdcore.export.base`), writes the chosen format into a temporary directory
beside ``--out`` together with the model card (:mod:`kdcore.export.card`) and
``export.json`` (what was written and the self-test's numbers), and renames it into
place, so an export exists completely or not at all. The exporters themselves live
with the students they know (``kd_plugins.text.export``, ``kd_plugins.speech.export``);
ONNX helpers shared by them are in :mod:`kdcore.export.onnx_tools`.
"""
from __future__ import annotations

from kdcore.export.base import Exporter, ExportResult

__all__ = ["ExportResult", "Exporter"]
