"""Which weights of a run are exported, and the proof that they are intact.

A finished run has ``metrics.json``. By default its best student
(``best/student.safetensors``, the weights ``metrics.json`` measured) is exported;
``--checkpoint`` names a checkpoint directory (``checkpoints/step-N``) instead.
Checkpoints carry sha256 manifests (:func:`kdcore.checkpoint.verify_checkpoint`).
``best/`` has none of its own, but it is written from the same state as the
checkpoint of its step, byte for byte, so the best student is verified against that
checkpoint's manifest when the checkpoint is still kept; otherwise only by loading it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcore.checkpoint import MANIFEST, checkpoint_name, list_checkpoints, verify_checkpoint
from kdcore.errors import KDUserError
from kdcore.io import sha256_file


@dataclass
class ExportWeights:
    """The safetensors file to export, its step and how it was verified."""

    path: Path
    step: int | None
    sha256: str
    verified_by: str
    #: Whether these are the weights metrics.json reports (the run's best, or final, student).
    measured: bool


def finished_run(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a finished run; refuses a directory that is not one."""
    if not (run_dir / "config.yaml").is_file():
        raise KDUserError(f"'{run_dir}' is not a kd run directory (no config.yaml). Pass the --out of a finished "
                          f"kd run to --run.")
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise KDUserError(f"The run in '{run_dir}' is not finished: it has no metrics.json (still training, "
                          f"interrupted, or a --dry-run). Finish it with 'kd run --resume --out {run_dir}' and "
                          f"export it afterwards; the model card needs its test metrics.")
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KDUserError(f"'{metrics_path}' cannot be read as JSON ({error}); the run's results are damaged. "
                          f"Run 'kd eval --run {run_dir}' to measure the student again.") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("student"), dict):
        raise KDUserError(f"'{metrics_path}' has no student metrics; it was not written by a finished kd run.")
    return metrics


def _verified_checkpoint(path: Path) -> str:
    problem = verify_checkpoint(path)
    if problem is not None:
        raise KDUserError(f"The checkpoint '{path}' fails its checksum test: {problem}. It is damaged; export "
                          f"another one (--checkpoint {path.parent}/step-N) or the best student (no --checkpoint).")
    return json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]["student.safetensors"]


def _checkpoint_dir(run_dir: Path, given: str) -> Path:
    path = Path(given)
    for candidate in (path, run_dir / "checkpoints" / given):
        if candidate.is_dir():
            return candidate
    if path.is_file() and path.parent.is_dir() and path.name == "student.safetensors":
        return path.parent
    available = ", ".join(p.name for p in list_checkpoints(run_dir / "checkpoints")) or "none"
    raise KDUserError(f"--checkpoint '{given}' is not a checkpoint directory (a step-N folder under "
                      f"{run_dir / 'checkpoints'}; available: {available}).")


def choose_weights(run_dir: Path, checkpoint: str | None) -> ExportWeights:
    """The weights to export: the best student, or the checkpoint ``--checkpoint`` names, verified."""
    best = run_dir / "best" / "student.safetensors"
    best_digest = sha256_file(best) if best.is_file() else None
    if checkpoint is not None:
        directory = _checkpoint_dir(run_dir, checkpoint)
        expected = _verified_checkpoint(directory)
        step = int(json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))["step"])
        measured = best_digest == expected or (best_digest is None and directory == _last_checkpoint(run_dir))
        return ExportWeights(directory / "student.safetensors", step, expected,
                             f"sha256 manifest of {directory.name}", measured)
    if best_digest is None:
        last = _last_checkpoint(run_dir)
        if last is None:
            raise KDUserError(f"The run in '{run_dir}' has no saved student: neither best/student.safetensors nor "
                              f"a checkpoint. It cannot be exported.")
        expected = _verified_checkpoint(last)
        step = int(last.name.removeprefix("step-"))
        return ExportWeights(last / "student.safetensors", step, expected, f"sha256 manifest of {last.name}", True)
    step = _best_step(run_dir)
    twin = run_dir / "checkpoints" / checkpoint_name(step) if step is not None else None
    if twin is not None and twin.is_dir():
        expected = _verified_checkpoint(twin)
        if expected != best_digest:
            raise KDUserError(f"best/student.safetensors of '{run_dir}' fails its checksum test: it differs from "
                              f"the student of {twin.name}, which was saved from the same weights. The file is "
                              f"damaged; export the checkpoint instead (--checkpoint {twin}) or run the training "
                              f"again.")
        return ExportWeights(best, step, best_digest, f"sha256 manifest of checkpoints/{twin.name}", True)
    return ExportWeights(best, step, best_digest, "loading (the checkpoint of its step is no longer kept)", True)


def _best_step(run_dir: Path) -> int | None:
    try:
        info = json.loads((run_dir / "best" / "info.json").read_text(encoding="utf-8"))
        return int(info["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    return checkpoints[-1] if checkpoints else None


__all__ = ["ExportWeights", "choose_weights", "finished_run"]
