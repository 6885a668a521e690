"""One run end to end: build, (dry-run plan | train), final evaluation, reports."""
from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from safetensors.torch import load_file

from kdcore import distributed
from kdcore.checkpoint import load_weights
from kdcore.config import dump_yaml_atomic
from kdcore.errors import KDUserError
from kdcore.evaluation import compare_with_teacher, evaluate_and_record_items, evaluate_model
from kdcore.hooks import RunState
from kdcore.interfaces import objective_summary
from kdcore.io import atomic_write_json
from kdcore.provenance import compare_fingerprints, read_provenance, record_provenance
from kdcore.registry import Registry
from kdcore.report import write_metrics, write_report
from kdcore.resolve import BuiltRun, ResolvedRun, build_components, select_device
from kdcore.seeding import seed_everything
from kdcore.significance import EVAL_ITEMS_FILE, ITEMS_FILE
from kdcore.tracking.registration import check_installed, reporting
from kdcore.trainer import Trainer

log = logging.getLogger(__name__)


def write_resolved_config(out_dir: Path, resolved_dict: dict[str, Any]) -> None:
    """``config.yaml``: the fully resolved config that ``--resume`` and ``kd eval`` validate again."""
    dump_yaml_atomic(resolved_dict, out_dir / "config.yaml")


def versions() -> dict[str, str]:
    import transformers

    import kdcore

    return {"kd": kdcore.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def parameter_counts(built: BuiltRun) -> dict[str, int]:
    """Teacher parameters and the student's deployed parameters (training-only heads excluded)."""
    return {"teacher": built.teacher.num_parameters(), "student": built.student.parameter_count_excluding()}


def check_cache_dir(resolved: ResolvedRun) -> None:
    """The cache directory from the config (or $KD_CACHE_DIR) must be a directory kd can create and write."""
    cache = resolved.config.resolved_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KDUserError(f"cache_dir '{cache}' (from the config key cache_dir or $KD_CACHE_DIR) cannot be used as a "
                          f"directory: {error.strerror or error}. Point it at a writable directory.") from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise KDUserError(f"cache_dir '{cache}' (from the config key cache_dir or $KD_CACHE_DIR) is not writable. "
                          f"Point it at a writable directory.")


def build(resolved: ResolvedRun, device: torch.device | None = None,
          dry_run: bool = False, registry: Registry | None = None,
          saved_run: tuple[Path, Mapping[str, Any]] | None = None) -> tuple[BuiltRun, Any]:
    """Teacher, student, method and data. Distributed: rank 0 first (it fills caches), then the others read them;
    a teacher stage trains on every rank together (:func:`~kdcore.resolve.build_components`).

    ``dry_run`` builds models with their real shapes but skips one-off work such as a teacher stage; ``saved_run``
    (a run directory and its task's stored files) makes the task read those files first (``kd eval``).
    """
    check_cache_dir(resolved)
    device = device if device is not None else select_device(resolved.config.device)
    seed_everything(resolved.config.seed)
    built = build_components(resolved, device, dry_run=dry_run, registry=registry, saved_run=saved_run)
    with distributed.main_first():
        splits = built.task.build_data(resolved.config.seed)
    for name in ("train", "valid", "test"):
        if len(getattr(splits, name)) == 0:
            raise KDUserError(f"Task '{resolved.config.task}' produced an empty {name} split: there is nothing to "
                              f"{'train on' if name == 'train' else 'evaluate on'}. Check the data section of the "
                              f"config (data.*) and the data files it names.")
    return built, splits


def plan(resolved: ResolvedRun, out_dir: Path) -> dict[str, Any]:
    """Build everything, write ``plan.json`` and return it (``kd run --dry-run``; rank 0 writes under torchrun)."""
    check_installed(resolved.trackers)  # a missing tracker extra is refused before anything is built
    built, splits = build(resolved, dry_run=True)
    writes = os.environ.get("RANK", "0") in ("", "0")
    if writes:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_resolved_config(out_dir, resolved.to_dict())
    summary = {
        "task": resolved.config.task,
        "plugin": resolved.config.plugin,
        "device": str(built.device),
        "params": parameter_counts(built),
        "student_trainable_params": built.student.num_parameters(trainable_only=True),
        "data": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test)},
        "objectives": {o.label: objective_summary(o.cls.name, o.weight, o.start, o.stop) for o in resolved.objectives},
        "trainer": resolved.config.trainer.model_dump(mode="json"),
    }
    if writes:
        atomic_write_json(out_dir / "plan.json", summary)
    return summary


def run(resolved: ResolvedRun, registry: Registry, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate teacher and best student on the test split, write metrics.json and report.md.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; they join one
    process group here, train together, and only rank 0 writes.
    """
    check_installed(resolved.trackers)  # before a long build (a teacher stage) and before any file is written
    state_of_ranks, device = distributed.init_from_env(resolved.config.device)
    try:
        # The output directory of rank 0 (a default --out has a timestamp that may differ by a second).
        out_dir = Path(distributed.broadcast_object(str(out_dir)))
        if state_of_ranks.is_main:
            # Before building: a run killed during a long build step (a teacher stage) can be resumed.
            out_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(out_dir, resolved.to_dict())
        built, splits = build(resolved, device, registry=registry)
        if state_of_ranks.is_main:
            record_provenance(built, out_dir)
        distributed.barrier()
        trainer = Trainer(built, splits, out_dir, registry)
        # The trackers of trainer.report_to hear the run from its first log record to its report.
        with reporting(registry, resolved.trackers):
            state = trainer.fit(resume=resume)
            metrics = finish(built, splits, out_dir, registry, state, trainer)
        # No rank leaves before rank 0 has written the reports: a gloo peer that exits early closes
        # its sockets under rank 0's transport threads, which then abort ("terminate called ...").
        distributed.barrier()
        return metrics
    finally:
        if state_of_ranks.enabled:
            distributed.shutdown()


def finish(built: BuiltRun, splits: Any, out_dir: Path, registry: Registry, state: RunState,
           trainer: Trainer) -> dict[str, Any]:
    """Final test evaluation of the best student; rank 0 writes metrics.json and report.md.

    A sharded (FSDP) student is evaluated on every rank (each forward gathers its
    shards); a replicated one on rank 0 while the others wait.
    """
    parallel = trainer.parallel
    rank = distributed.current()
    all_ranks = parallel is not None and parallel.evaluates_on_all_ranks()
    best = out_dir / "best" / "student.safetensors"
    if not rank.is_main and not all_ranks:
        return distributed.broadcast_object(None)  # rank 0 evaluates, writes the reports and shares the metrics
    if parallel is not None and not all_ranks:
        parallel.close()
    if best.exists():
        if all_ranks:
            parallel.load_model_state(load_file(str(best), device="cpu"))
        else:
            load_weights(built.student, best)
    batch_size = trainer.eval_batch_size()
    log.info("Test split: evaluating the student.")
    student_metrics = evaluate_and_record_items(built, built.student, splits.test, out_dir / ITEMS_FILE, batch_size)
    teacher_metrics: dict[str, Any] = {}
    if built.resolved.config.trainer.evaluate_teacher:
        recorded = built.teacher.recorded_metrics()
        if recorded is None:
            log.info("Test split: evaluating the teacher.")
        teacher_metrics = recorded if recorded is not None else evaluate_model(built, built.teacher, splits.test,
                                                                                batch_size)
        student_metrics.update(compare_with_teacher(built, splits.test, batch_size))
    if not rank.is_main:
        return distributed.broadcast_object(None)
    registry.hook.kd_on_evaluation_end(context=trainer.context, step=-1, metrics=student_metrics)
    metrics = {
        "task": built.resolved.config.task,
        "plugin": built.resolved.config.plugin,
        "params": parameter_counts(built),
        "teacher": teacher_metrics,
        "student": student_metrics,
        "metric": built.task.metric,
        "metric_metadata": built.task.metric_metadata(),
        "best_step": state.best_step,
        "selection": built.resolved.config.trainer.select,
        "train_seconds": round(float(state.train_seconds), 3),
        "nonfinite_steps": state.nonfinite_steps,
        "device": str(built.device),
        "world_size": rank.world_size,
        "seed": built.resolved.config.seed,
        "versions": versions(),
    }
    if state.time_budget is not None:
        metrics["time_budget"] = state.time_budget
    if state.stop_reason is not None:
        metrics["stopped_early"] = {"step": state.stopped_at_step, "max_steps": state.max_steps,
                                    "reason": state.stop_reason}
    write_metrics(out_dir, metrics)
    write_report(out_dir, metrics, built.task.metric)
    registry.hook.kd_on_train_end(context=trainer.context, metrics=metrics)
    return distributed.broadcast_object(metrics)


def evaluate_saved(resolved: ResolvedRun, run_dir: Path,
                   files: dict[str, Path] | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """Evaluate the saved (best, else last) student of ``run_dir`` on the test split again.

    With ``files`` (role -> path, e.g. source/reference), the task reads the user's
    own evaluation set through :meth:`~kdcore.interfaces.Task.load_eval_files` instead.
    Returns the metrics and the task's :meth:`~kdcore.interfaces.Task.metric_metadata`.

    The student's per-item test statistics (:mod:`kdcore.significance`) go to ``<run>/eval_items.json`` when the
    test split is scored. Only the student is scored, so the teacher is built as a dry run builds it (its shape;
    never a teacher stage).
    The task reads the files the run stored (``provenance.json``, e.g. its tokenizer) instead of the cache, and a
    rebuilt test split whose fingerprint differs from the recorded one is reported.
    """
    from kdcore.checkpoint import list_checkpoints

    recorded = read_provenance(run_dir)
    built, splits = build(resolved, dry_run=True, saved_run=(run_dir, recorded.get("task_files", {})))
    if not files and recorded.get("fingerprints"):
        compare_fingerprints(recorded["fingerprints"], built.task.fingerprints(), run_dir, names=("test",))
    weights = run_dir / "best" / "student.safetensors"
    if not weights.exists():
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        if not checkpoints:
            raise KDUserError(f"'{run_dir}' has no saved student (no best/student.safetensors and no checkpoints).")
        weights = checkpoints[-1] / "student.safetensors"
    load_weights(built.student, weights)
    batch_size = resolved.config.trainer.eval_batch_size or resolved.config.trainer.batch_size
    unknown = sorted(set(files or {}) - set(built.task.eval_file_roles))
    if unknown and built.task.eval_file_roles:
        raise KDUserError(f"Task '{built.task.name}' does not take evaluation files {unknown}; it takes "
                          f"{', '.join('--' + role for role in built.task.eval_file_roles)}.")
    dataset = built.task.load_eval_files(files) if files else splits.test
    if len(dataset) == 0:
        raise KDUserError(f"The evaluation set is empty (files: {files or 'the task test split'}).")
    if files:
        metrics = evaluate_model(built, built.student, dataset, batch_size)
    else:
        metrics = evaluate_and_record_items(built, built.student, dataset, run_dir / EVAL_ITEMS_FILE, batch_size)
    return metrics, built.task.metric_metadata()
