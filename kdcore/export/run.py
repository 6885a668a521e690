"""``kd export``: check the run, build its student, write one format and the model card, rename into place."""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from kdcore.errors import KDUserError
from kdcore.export.base import BUILTIN_EXPORTERS, Exporter, ExportResult
from kdcore.export.card import model_card
from kdcore.export.weights import ExportWeights, choose_weights, finished_run
from kdcore.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class ExportSummary:
    """What ``kd export`` wrote."""

    directory: Path
    fmt: str
    result: ExportResult
    weights: ExportWeights


def exporter_classes() -> list[type[Exporter]]:
    """The built-in exporters (imported now: only ``kd export`` needs them)."""
    from kdcore.registry import import_target

    return [import_target(target) for target in BUILTIN_EXPORTERS]


def _check_out(out_dir: Path, run_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KDUserError(f"--out '{out_dir}' already exists and is not an empty directory; kd export does not "
                          f"overwrite. Choose a new --out or remove the old export first.")
    if out_dir.resolve() == run_dir.resolve():
        raise KDUserError(f"--out '{out_dir}' is the run directory itself; choose a new directory for the export.")
    parent = out_dir.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise KDUserError(f"The directory that would hold --out '{out_dir}' ({parent}) does not exist or is not "
                          f"writable. Create it or choose another --out.")


def _load_student(built: Any, weights: ExportWeights) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights.path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise KDUserError(f"'{weights.path}' cannot be read as safetensors ({error}): the saved student is damaged. "
                          f"Export a checkpoint instead (--checkpoint) or run the training again.") from None
    try:
        built.student.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1:2] or [str(error)]
        raise KDUserError(f"'{weights.path}' does not hold the student that the run's config.yaml describes "
                          f"({first[0].strip()}). Was config.yaml edited after the run?") from None
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise KDUserError(f"'{weights.path}' holds NaN or infinite weights; such a student cannot be deployed. "
                          f"Export an earlier checkpoint (--checkpoint).")


def pick_exporter(built: Any, splits: Any, fmt: str | None) -> tuple[Exporter, str]:
    """The exporter of the run's student and the format to write (its default when ``fmt`` is None)."""
    student = built.student
    for cls in exporter_classes():
        if cls.fits(student):
            exporter = cls(built, splits)
            break
    else:
        raise KDUserError(f"kd export knows no format for the student '{built.resolved.config.student.name}' "
                          f"({type(student).__name__}); it exports the text students (seq2seq, causal-lm), "
                          f"DistilHuBERT and GenDistiller (docs/export.md).")
    # Default: the first format this student can take (a pre-LN DistilHuBERT cannot take hf, its first).
    chosen = fmt or next((name for name in exporter.formats if exporter.refusal(name) is None),
                         next(iter(exporter.formats)))
    if chosen not in exporter.formats:
        listed = "; ".join(f"{name}: {text}" for name, text in exporter.formats.items())
        raise KDUserError(f"--format '{chosen}' does not fit the student '{built.resolved.config.student.name}' "
                          f"({type(student).__name__}). Its formats are {listed}.")
    problem = exporter.refusal(chosen)
    if problem is not None:
        others = ", ".join(name for name in exporter.formats if name != chosen and exporter.refusal(name) is None)
        raise KDUserError(f"--format '{chosen}' does not fit this student: {problem}."
                          + (f" It can be exported as: {others}." if others else ""))
    return exporter, chosen


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str | None = None, checkpoint: str | None = None,
               license_id: str = "other") -> ExportSummary:
    """Export the student of the finished run ``run_dir`` to ``out_dir`` (which must not exist yet, or be empty)."""
    from kdcore import runner
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_saved_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    metrics = finished_run(run_dir)
    weights = choose_weights(run_dir, checkpoint)
    _check_out(out_dir, run_dir)
    if fmt == "onnx":
        from kdcore.export.onnx_tools import require_onnx

        require_onnx()  # before the (slow) build
    registry = Registry.discover()
    resolved = resolve_saved_run(registry, run_dir)
    built, splits = runner.build(resolved, torch.device("cpu"), registry=registry)
    _load_student(built, weights)
    built.student.eval()
    exporter, chosen = pick_exporter(built, splits, fmt)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        result = exporter.write(chosen, staging)
        result.usage = result.usage.replace("EXPORT_DIR", str(out_dir))  # the loading code names this export
        card = model_card(run_dir, resolved, metrics, result, chosen, license_id, weights, exporter.describe_student())
        atomic_write_text(staging / "README.md", card)
        atomic_write_json(staging / "export.json", {
            "format": chosen, "run": str(run_dir.resolve()), "weights": str(weights.path.resolve()),
            "step": weights.step, "sha256": weights.sha256, "verified_by": weights.verified_by,
            "files": sorted([*result.files, "README.md", "export.json"]), "self_test": result.checks,
            "speed": result.speed})
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above): rename replaces nothing of the user's
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportSummary(out_dir, chosen, result, weights)


__all__ = ["ExportSummary", "export_run", "exporter_classes", "pick_exporter"]
