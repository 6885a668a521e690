"""Scoring a model with its task's metrics, outside the training random streams."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdcore.interfaces import Model
from kdcore.resolve import BuiltRun


def evaluate_model(built: BuiltRun, model: Model, dataset: Sequence[Any], batch_size: int) -> dict[str, float]:
    """The task's metrics for ``model`` on ``dataset`` (``built``'s task and device), outside the training RNG."""
    was_training = model.training
    model.eval()
    try:
        devices = [built.device] if built.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            metrics = built.task.evaluate(model, dataset, built.device, batch_size)
    finally:
        model.train(was_training)
    if built.task.metric not in metrics:
        raise RuntimeError(f"task '{built.task.name}' did not report its metric '{built.task.metric}'")
    return {k: float(v) for k, v in metrics.items()}


def compare_with_teacher(built: BuiltRun, dataset: Sequence[Any], batch_size: int) -> dict[str, float]:
    """The task's metrics of the student relative to the teacher (:meth:`~kdcore.interfaces.Task.compare_models`),
    both in eval mode, outside the training RNG."""
    models = (built.student, built.teacher)
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        devices = [built.device] if built.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            metrics = built.task.compare_models(built.student, built.teacher, dataset, built.device, batch_size)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return {k: float(v) for k, v in metrics.items()}
