"""Scoring a model with its task's metrics, outside the training random streams."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from kdcore.interfaces import Model
from kdcore.resolve import BuiltRun


@contextlib.contextmanager
def _scoring(built: BuiltRun, *models: Model) -> Iterator[None]:
    """``models`` in eval mode, under ``no_grad``, outside the training random streams; their modes restored after."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        devices = [built.device] if built.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def evaluate_model(built: BuiltRun, model: Model, dataset: Sequence[Any], batch_size: int) -> dict[str, float]:
    """The task's metrics for ``model`` on ``dataset`` (``built``'s task and device), outside the training RNG."""
    with _scoring(built, model):
        metrics = built.task.evaluate(model, dataset, built.device, batch_size)
    if built.task.metric not in metrics:
        raise RuntimeError(f"task '{built.task.name}' did not report its metric '{built.task.metric}'")
    return {k: float(v) for k, v in metrics.items()}


def compare_with_teacher(built: BuiltRun, dataset: Sequence[Any], batch_size: int) -> dict[str, float]:
    """The task's metrics of the student relative to the teacher (:meth:`~kdcore.interfaces.Task.compare_models`),
    both in eval mode, outside the training RNG."""
    with _scoring(built, built.student, built.teacher):
        metrics = built.task.compare_models(built.student, built.teacher, dataset, built.device, batch_size)
    return {k: float(v) for k, v in metrics.items()}
