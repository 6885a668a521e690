"""The teacher stage: a task-trained teacher trained by the one engine before the run that distils from it.

A task whose default teacher is trained on the task's own data (the text tasks' Marian, the toy MLP) runs a
*sub-run* of the engine: the teacher-to-be is the trainable model, the method is kdcore's base :class:`Method`
comparing on the data batch, and the loss is the ``nll`` objective on the batch's labels. The sub-run therefore
has everything a distillation run has: checkpoints, exact resume, lifecycle hooks, log.jsonl and the engine's
precision, clipping and non-finite handling.

Its files live in a *partial directory* next to the teacher's cache entry, named by the same content key
(:func:`partial_directory`): ``log.jsonl`` and ``checkpoints/``. Because the key names everything that decides the
teacher's weights (task, data, settings, recipe), a later run with the same key continues the stage from its last
checkpoint, with or without ``--resume``, and ends with the same weights as an uninterrupted stage. The finished
teacher is written as a verified cache entry (:mod:`kdcore.cache`: content manifest last, renamed into place) and
then the partial directory is removed (:func:`remove_partial_directory`), so an interrupted stage is never mistaken
for a cached teacher, and a damaged cached teacher is moved aside and trained again instead of being used.

Two processes that need the same teacher at once (two runs sharing a cache) take turns through the entry's lock
(:func:`kdcore.cache.entry_lock`): the second waits, then finds the teacher cached. Under torchrun the stage is
data-parallel, like a distillation run: a factory that runs it sets ``builds_on_all_ranks``, so every rank enters
:func:`ensure_teacher_cached` together; rank 0 holds the lock and decides whether to train, every rank trains its
slice of each global batch, rank 0 alone writes the checkpoints, the log and the cache entry, and the other ranks
then read the cached teacher.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from kdcore import distributed
from kdcore.cache import PARTIAL_SUFFIX, entry_lock, publish_entry, usable_entry
from kdcore.checkpoint import CHECKPOINT_PREFIX, capture_rng, latest_valid_checkpoint, restore_rng
from kdcore.config import ModelSpec, ObjectiveSpec, RunConfig, TrainerConfig
from kdcore.errors import KDUserError
from kdcore.interfaces import (
    DataSplits, EmptyConfig, Method, ModelFactory, Student, Task, WeightedObjective,
)
from kdcore.interrupts import TrainingInterrupted
from kdcore.io import read_jsonl
from kdcore.objectives.library import NLLConfig, TokenNLLObjective
from kdcore.registry import Registry
from kdcore.resolve import BuiltRun, ResolvedObjective, ResolvedRun
from kdcore.trainer import Trainer

log = logging.getLogger(__name__)

#: ``RunConfig.plugin`` of a teacher stage: what its progress lines, log records and hooks call the method.
TEACHER_STAGE = "teacher-stage"


def partial_directory(cache_entry: Path) -> Path:
    """The partial directory of the teacher cached at ``cache_entry`` (a directory or a file): same name + ``.partial``."""
    return cache_entry.with_name(cache_entry.name + PARTIAL_SUFFIX)


def remove_partial_directory(cache_entry: Path) -> None:
    """Remove the partial directory of a teacher once its cache entry is complete."""
    shutil.rmtree(partial_directory(cache_entry), ignore_errors=True)


Trained = TypeVar("Trained")
Loaded = TypeVar("Loaded")


def ensure_teacher_cached(cache_entry: Path, kind: str, built_from: Mapping[str, Any], train: Callable[[], Trained],
                          write: Callable[[Trained, Path], dict[str, Any] | None], load: Callable[[], Loaded], *,
                          what: str, reject: Callable[[dict[str, Any]], str | None] | None = None) -> Loaded:
    """The teacher cached at ``cache_entry``, loaded by ``load()``; trained first when the cache has no usable one.

    When the entry is missing or damaged (moved aside, with a warning), ``train()`` runs the teacher stage and
    ``write(trained, directory)`` writes its files into the entry's staging directory; the content manifest
    (``kind``, ``built_from``, and ``write``'s returned dict as its info) goes last, then the entry is renamed into
    place and the partial directory removed. ``what`` names the teacher in the log line of a process that waits.
    ``reject(manifest)`` may name why a complete entry does not serve this run (it is then trained again and
    replaced).

    Under torchrun every rank calls this together (its factory sets ``builds_on_all_ranks``): rank 0 takes the
    lock and decides for all, every rank trains (the stage is data-parallel), rank 0 alone writes, and every rank
    loads the complete entry while rank 0 still holds the lock (so ``kd cache clear`` cannot remove it meanwhile).
    """
    rank = distributed.current()
    with entry_lock(cache_entry, what) if rank.is_main else contextlib.nullcontext():
        cached = None
        if rank.is_main:
            manifest = usable_entry(cache_entry, kind)
            reason = reject(manifest) if manifest is not None and reject is not None else None
            if reason is not None:
                log.warning("Teacher stage: %s cached in %s does not serve this run: %s; training it again.", what,
                            cache_entry, reason)
            cached = manifest is not None and reason is None
        if not distributed.broadcast_object(cached):
            if rank.is_main and not cache_entry.exists():
                log.info("Teacher stage: %s is not cached (%s); training it.", what, cache_entry)
            trained = train()
            if rank.is_main:
                publish_entry(cache_entry, kind, built_from, lambda staging: write(trained, staging))
        if rank.is_main:
            remove_partial_directory(cache_entry)
        distributed.barrier()
        loaded = load()
        distributed.barrier()
    return loaded


@dataclass
class TeacherStageResult:
    """What a finished teacher stage reports: the trainer's state and the mean training loss at the end."""

    steps: int
    train_seconds: float
    final_loss: float
    resumed_from_step: int | None
    #: Set when the stage's time budget lowered its steps (planned_steps, max_steps, budget_minutes, reason).
    time_budget: dict[str, Any] | None = None


def train_teacher_stage(task: Task, model: Student, factory: type[ModelFactory], factory_config: Any,
                        trainer: TrainerConfig, *, train: Sequence[Any], seed: int, cache_entry: Path,
                        device: torch.device, registry: Registry | None = None,
                        method_class: type[Method] = Method) -> TeacherStageResult:
    """Train ``model`` (the teacher-to-be, already on ``device``) on ``train`` with the task's NLL, on the engine.

    ``method_class`` arranges each batch for the NLL: the base :class:`Method` hands the batch's labels over as they
    are (they must already be aligned with the model's outputs); a task whose models predict the next token passes
    one that aligns them.

    ``trainer`` holds the stage's optimisation settings; ``seed`` seeds its data order and random streams (the
    teacher does not depend on the run seed). ``factory``/``factory_config`` name the teacher being trained (in
    the stage's config, which hooks see). The stage continues from the newest valid checkpoint in the partial
    directory of ``cache_entry`` when there is one. The random streams of the calling process are restored
    afterwards, so the run that follows builds its student exactly as with a cached teacher. Under torchrun every
    rank calls this together (from :func:`ensure_teacher_cached`) and trains its slice of each global batch.
    """
    rank = distributed.current()
    if rank.enabled and not factory.builds_on_all_ranks:
        raise TypeError(f"{factory.__name__} runs a teacher stage, which trains on every rank of a torchrun job "
                        f"together; set builds_on_all_ranks = True on it.")
    directory = partial_directory(cache_entry)
    config = RunConfig(task=task.name, plugin=TEACHER_STAGE, seed=seed,
                       teacher=ModelSpec(name=factory.name), student=ModelSpec(name=factory.name),
                       objectives={"nll": ObjectiveSpec(name=TokenNLLObjective.name)}, trainer=trainer)
    nll = ResolvedObjective("nll", TokenNLLObjective, NLLConfig(), 1.0)
    resolved = ResolvedRun(config, type(task), Method, task.data_config, EmptyConfig(), factory, factory_config,
                           factory, factory_config, [nll])
    # The stage has no teacher: its only objective (nll) asks the teacher for nothing, so compare never calls it.
    method = method_class(EmptyConfig(), task, None, model,  # type: ignore[arg-type]
                          [WeightedObjective("nll", TokenNLLObjective(), 1.0)])
    built = BuiltRun(resolved, task, None, model, method, device)  # type: ignore[arg-type]
    if registry is None:
        registry = Registry.discover(entry_points=False)  # built-ins only: no third-party lifecycle hooks
    checkpoint = None
    if rank.is_main:  # it decides for every rank whether the stage continues (the trainer reads the same one)
        directory.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_valid_checkpoint(directory / "checkpoints")
    resumed_from = distributed.broadcast_object(
        None if checkpoint is None else int(checkpoint.name[len(CHECKPOINT_PREFIX):]))
    if rank.is_main and resumed_from is not None:
        log.info("Teacher stage: continuing from its checkpoint at step %d of %d (%s).", resumed_from,
                 trainer.max_steps, checkpoint)
    if rank.is_main and rank.enabled:
        log.info("Teacher stage: data-parallel on %d processes, each its slice of every global batch of %d.",
                 rank.world_size, trainer.batch_size)
    stage = Trainer(built, DataSplits(train=train, valid=[], test=[]), directory, registry, evaluate_in_loop=False)
    outer_rng = capture_rng()
    try:
        state = stage.fit(resume=resumed_from is not None)
    except TrainingInterrupted as interrupted:  # Ctrl-C/SIGTERM: the checkpoint is written; say how to go on
        message = str(interrupted).replace(f"kd run --out {directory} --resume",
                                           "the same kd run command (the teacher stage continues from there)")
        raise TrainingInterrupted(f"Teacher stage: {message}", interrupted.exit_code - 128) from None
    except KDUserError as error:
        raise KDUserError(f"Teacher stage (its trainer settings are teacher.args: train_steps, batch_size, lr, "
                          f"warmup_steps, precision): {error}") from None
    finally:
        restore_rng(*outer_rng)
        if stage.parallel is not None:
            stage.parallel.close()  # the model's own forward_signals again, not the data-parallel wrapper's
    if state.step < state.max_steps:
        raise KDUserError(f"Teacher stage: a hook stopped it at step {state.step} of {state.max_steps} "
                          f"({state.stop_reason}); an unfinished teacher is not cached. Its checkpoint in "
                          f"{directory} is kept: run again to continue it.")
    return TeacherStageResult(state.max_steps, float(state.train_seconds),
                              _final_loss(directory, trainer.log_every, state.max_steps), resumed_from,
                              state.time_budget)


def _final_loss(directory: Path, log_every: int, steps: int) -> float:
    """Mean logged training loss over the last tenth of the stage's ``steps`` (at least the last record); NaN
    without records."""
    records = [r for r in read_jsonl(directory / "log.jsonl") if r.get("type") == "train"]
    if not records:
        return float("nan")
    window = max(log_every, steps // 10)
    last = [float(r["loss"]) for r in records if int(r["step"]) > steps - window] or \
        [float(records[-1]["loss"])]
    return sum(last) / len(last)


__all__ = ["TEACHER_STAGE", "TeacherStageResult", "ensure_teacher_cached", "remove_partial_directory",
           "partial_directory", "train_teacher_stage"]
