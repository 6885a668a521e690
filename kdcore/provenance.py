"""``<out>/provenance.json``: what a run was made from, so its directory can be evaluated again on its own.

A run records the content fingerprints of its teacher (sha256 of the weights), its data and tokenizer
(:meth:`~kdcore.interfaces.Task.fingerprints`) and the small files its task copied next to the student
(:meth:`~kdcore.interfaces.Task.save_run_files`, e.g. the text tokenizer in ``<out>/tokenizer/``). ``kd eval --run``
reads the copied files instead of the cache and says which recorded fingerprint differs from what it rebuilt.
docs/runs.md describes the files of a run directory.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import KDUserError
from kdcore.io import atomic_write_json

log = logging.getLogger(__name__)

PROVENANCE = "provenance.json"
PROVENANCE_FORMAT = "kd-provenance/1"


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over each state-dict tensor's name, shape, dtype and raw bytes: identifies weights whatever file or
    cache entry they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        # The raw bytes through the buffer protocol (no float copy of a large teacher's weights).
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def record_provenance(built: Any, out_dir: Path) -> dict[str, Any]:
    """Copy the task's run files into ``out_dir`` and write ``provenance.json`` (after the task's data are built).

    ``built`` is the run's :class:`~kdcore.resolve.BuiltRun`.
    """
    config = built.resolved.config
    record = {
        "format": PROVENANCE_FORMAT,
        "task": config.task,
        "teacher": {"name": config.teacher.name, "weights_sha256": weights_sha256(built.teacher),
                    "parameters": built.teacher.num_parameters()},
        "student": {"name": config.student.name},
        "fingerprints": built.task.fingerprints(),
        "task_files": built.task.save_run_files(out_dir),
        "cache_dir": str(config.resolved_cache_dir()),
    }
    atomic_write_json(out_dir / PROVENANCE, record)
    return record


def read_provenance(run_dir: Path) -> dict[str, Any]:
    """The run's ``provenance.json``; empty for a run written by a kd that did not record one."""
    path = Path(run_dir) / PROVENANCE
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KDUserError(f"'{path}' is unreadable ({error}); it records the fingerprints of the teacher, tokenizer "
                          f"and data of the run. Copy it again from the original run directory, or delete it to "
                          f"evaluate without the checks it makes possible.") from None
    if not isinstance(record, dict) or record.get("format") != PROVENANCE_FORMAT:
        raise KDUserError(f"'{path}' is not a kd provenance record (expected format {PROVENANCE_FORMAT!r}). Copy it "
                          f"again from the original run directory, or delete it to evaluate without its checks.")
    return record


def compare_fingerprints(recorded: Mapping[str, str], current: Mapping[str, str], run_dir: Path,
                         names: tuple[str, ...] | None = None) -> list[str]:
    """Warn about every recorded fingerprint (of ``names``, default all) that the rebuilt task does not have;
    return the names that differ."""
    differing = []
    for name, value in recorded.items():
        if names is not None and name not in names:
            continue
        now = current.get(name)
        if now is not None and now != value:
            differing.append(name)
            log.warning("The %s fingerprint of the rebuilt task is %s, but the run in %s recorded %s: the scores "
                        "are for different %s than the run's metrics.json.", name, now[:16], run_dir, value[:16],
                        "test data" if name == "test" else name)
    return differing


__all__ = ["PROVENANCE", "PROVENANCE_FORMAT", "compare_fingerprints", "read_provenance", "record_provenance",
           "weights_sha256"]
