"""Scoring a model with its task's metrics, outside the training random streams."""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdcore.interfaces import Model
from kdcore.resolve import BuiltRun


#: Where :func:`record_items` puts what a task reports, while :func:`recording_items` is active.
_ITEM_SINK: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("kd_item_sink", default=None)


def record_items(decoding: str, items: Sequence[Mapping[str, Any]], aggregates: Mapping[str, str]) -> None:
    """A task's per-item test results for the paired bootstrap (:mod:`kdcore.significance`); a no-op unless the
    engine is recording (the final test evaluation, ``kd eval``).

    ``decoding``: ``greedy`` or ``beamK``. ``items``: one mapping per test item, in the dataset's order, with its
    ``id`` and ``stats`` (metric name -> list of numbers, the sufficient statistics) and anything else worth keeping
    (``hypothesis``, ``reference``). ``aggregates``: metric name -> how its corpus score follows from the summed
    statistics (:data:`kdcore.significance.AGGREGATES`).
    """
    sink = _ITEM_SINK.get()
    if sink is None:
        return
    from kdcore.significance import AGGREGATES

    unknown = sorted(set(aggregates.values()) - set(AGGREGATES))
    if unknown:
        raise ValueError(f"record_items: unknown aggregates {unknown}; known: {', '.join(AGGREGATES)}")
    entry = sink.setdefault(decoding, {"aggregates": {}, "items": None})
    entry["aggregates"].update(aggregates)
    if entry["items"] is None:
        entry["items"] = [dict(item) for item in items]
    else:  # another call for the same decoding adds metrics to the same items
        for kept, item in zip(entry["items"], items):
            kept.setdefault("stats", {}).update(item.get("stats", {}))


def is_recording_items() -> bool:
    """Whether :func:`record_items` keeps what it is given (tasks skip computing per-item statistics otherwise)."""
    return _ITEM_SINK.get() is not None


@contextlib.contextmanager
def recording_items() -> Iterator[dict[str, Any]]:
    """Collect what :func:`record_items` reports inside the block: ``{decoding: {"aggregates", "items"}}``."""
    sink: dict[str, Any] = {}
    token = _ITEM_SINK.set(sink)
    try:
        yield sink
    finally:
        _ITEM_SINK.reset(token)


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


def evaluate_and_record_items(built: BuiltRun, model: Model, dataset: Sequence[Any], path: Path,
                              batch_size: int) -> dict[str, float]:
    """:func:`evaluate_model`, writing the per-item results the task reports (:func:`record_items`) to ``path``
    (JSON, atomically; nothing when the task reports none)."""
    from kdcore.io import atomic_write_json

    with recording_items() as items:
        metrics = evaluate_model(built, model, dataset, batch_size)
    if items:
        atomic_write_json(path, {"split": "test", "role": "student", "decodings": items})
    return metrics


def compare_with_teacher(built: BuiltRun, dataset: Sequence[Any], batch_size: int) -> dict[str, float]:
    """The task's metrics of the student relative to the teacher (:meth:`~kdcore.interfaces.Task.compare_models`),
    both in eval mode, outside the training RNG."""
    with _scoring(built, built.student, built.teacher):
        metrics = built.task.compare_models(built.student, built.teacher, dataset, built.device, batch_size)
    return {k: float(v) for k, v in metrics.items()}
