"""Experiment tracking (``trainer.report_to``): trackers are lifecycle-hook plugins, one registry kind.

:class:`Tracker` (in :mod:`kdcore.tracking.base`) turns the public hooks into a tracker's own calls; the built-in
trackers (TensorBoard, MLflow, W&B) subclass it, each in its own module that imports its library only when a run
opens it, so importing kd never imports a tracker. :mod:`kdcore.tracking.registration` is the one place the engine
uses: it looks the names of ``trainer.report_to`` up in the registry and registers one instance of each for a run.
See docs/tracking.md.
"""
from __future__ import annotations

from kdcore.tracking.base import Tracker

__all__ = ["Tracker"]
