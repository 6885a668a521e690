"""Checkpoints: safetensors only (no pickle), written atomically, verified on load.

A checkpoint is a directory ``step-XXXXXXXX`` holding
``student.safetensors`` (the student's state dict: all weights, or for a student with a frozen
part, such as a LoRA student, the trainable part and the frozen part's sha256; kd_plugins.text.lora),
``optimizer.safetensors`` (optimizer tensors;
its param_groups as JSON metadata), ``trainer_state.json`` (step, data position,
scheduler, scaler, best metric, Python/NumPy RNG) and ``rng.safetensors`` (torch
RNG states), plus ``manifest.json`` with each file's sha256, written last.
The directory is assembled under a temporary name and renamed into place, so a
checkpoint either exists completely or not at all; a checkpoint whose checksums
do not match is skipped with a warning and the previous one is used.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kdcore.io import atomic_write_json, follow_umask, sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"
REQUIRED_FILES = frozenset({"student.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"})


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


#: Called as ``observer(stage, step, path)`` at each stage of :func:`save_checkpoint` (see ``CHECKPOINT_STAGES``).
#: A seam for fault-injection tests (tests/fixtures/kd-fault-injection): an observer may raise (e.g.
#: ``OSError(ENOSPC)``) or kill the process to simulate a crash or a full disk at that exact moment.
WriteObserver = Callable[[str, int, Path], None]
_write_observers: list[WriteObserver] = []
CHECKPOINT_STAGES = ("staging-created", "student-written", "optimizer-written", "rng-written", "state-written",
                     "manifest-written", "renamed", "pruned")


def add_write_observer(observer: WriteObserver) -> None:
    """Register ``observer`` for the stages of every later checkpoint write."""
    if observer not in _write_observers:
        _write_observers.append(observer)


def _notify(stage: str, step: int, path: Path) -> None:
    for observer in list(_write_observers):
        observer(stage, step, path)


def _temp_path(path: Path) -> Path:
    """A fresh temporary name next to ``path``: concurrent writers (ranks, runs sharing a cache) never collide."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(name)


def save_state_dict(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Tensors as safetensors, written through a unique temp file and ``os.replace``."""
    unique: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, tensor in state.items():
        # Tied weights (embeddings and LM head) share a storage, which safetensors refuses: clone repeats.
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        unique[key] = tensor.clone() if pointer in seen_storage else tensor
        if pointer != -1:
            seen_storage.add(pointer)
    temp = _temp_path(path)
    try:
        save_file(_contiguous_cpu(unique), str(temp), metadata=metadata)
        follow_umask(temp)  # after writing: safetensors replaces the file mkstemp made
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Module weights as safetensors, written through a temp file and ``os.replace``."""
    save_state_dict(module.state_dict(), path)


def load_weights(module: torch.nn.Module, path: Path, strict: bool = True) -> None:
    state = load_file(str(path), device="cpu")
    module.load_state_dict(state, strict=strict)


def _optimizer_to_safetensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Optimizer tensors plus JSON metadata; state keys may be indices (plain) or parameter names (FSDP)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    state_keys = list(state_dict["state"])
    for position, values in enumerate(state_dict["state"].values()):
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{position}.{key}"] = value
            else:
                scalars.setdefault(str(position), {})[key] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars),
                "state_keys": json.dumps(state_keys)}
    return tensors, metadata


def _optimizer_from_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    by_position: dict[int, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        for name in handle.keys():
            _, position, key = name.split(".", 2)
            by_position.setdefault(int(position), {})[key] = handle.get_tensor(name)
    for position, values in json.loads(metadata.get("scalars", "{}")).items():
        by_position.setdefault(int(position), {}).update(values)
    state_keys = json.loads(metadata["state_keys"]) if "state_keys" in metadata else sorted(by_position)
    state = {state_keys[position]: values for position, values in sorted(by_position.items())}
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch RNG states as tensors; Python and NumPy states as JSON-able values."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    plain = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [numpy_state[0], numpy_state[1].tolist(), int(numpy_state[2]), int(numpy_state[3]),
                  float(numpy_state[4])],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    trainer_state: dict[str, Any]
    optimizer_state: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    rank_rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = field(default_factory=dict)

    def rng_for_rank(self, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The RNG states saved for ``rank`` (None when the run had fewer ranks)."""
        if rank == 0:
            return self.rng_tensors, self.trainer_state["rng"]
        return self.rank_rng.get(rank)


def save_checkpoint(directory: Path, step: int, student: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict[str, Any], trainer_state: dict[str, Any], keep: int,
                    rank_rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None) -> Path:
    """Write ``<directory>/step-N`` completely or not at all; keep the newest ``keep``.

    ``student`` and ``optimizer`` may be given as modules or as (full) state dicts;
    ``rank_rngs`` holds each rank's :func:`capture_rng` in rank order (default: this
    process only), so a distributed run resumes every rank's random streams.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    staging = directory / f".{checkpoint_name(step)}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        _notify("staging-created", step, staging)
        model_state = student.state_dict() if isinstance(student, torch.nn.Module) else student
        save_state_dict(model_state, staging / "student.safetensors")
        _notify("student-written", step, staging)
        optimizer_state = optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        optimizer_tensors, optimizer_metadata = _optimizer_to_safetensors(optimizer_state)
        save_state_dict(optimizer_tensors, staging / "optimizer.safetensors", metadata=optimizer_metadata)
        _notify("optimizer-written", step, staging)
        rngs = rank_rngs if rank_rngs else [capture_rng()]
        rng_tensors = dict(rngs[0][0])
        for rank, (tensors, _) in enumerate(rngs[1:], start=1):
            rng_tensors.update({f"rank{rank}/{key}": value for key, value in tensors.items()})
        save_state_dict(rng_tensors, staging / "rng.safetensors")
        _notify("rng-written", step, staging)
        rank_plain = {str(rank): plain for rank, (_, plain) in enumerate(rngs[1:], start=1)}
        atomic_write_json(staging / "trainer_state.json",
                          {**trainer_state, "step": step, "rng": rngs[0][1], "rank_rng": rank_plain,
                           "world_size": len(rngs)})
        _notify("state-written", step, staging)
        files = sorted(p.name for p in staging.iterdir())
        atomic_write_json(staging / MANIFEST, {"step": step, "files": {n: sha256_file(staging / n) for n in files}})
        _notify("manifest-written", step, staging)
        _fsync_directory(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_directory(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _notify("renamed", step, final)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    _notify("pruned", step, final)
    return final


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first."""
    if not directory.exists():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file matches the manifest, otherwise the reason it does not."""
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        return "manifest.json is missing"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bytes that are not UTF-8
        return f"manifest.json is unreadable ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        return "manifest.json does not list the files and their checksums"
    unlisted = sorted(REQUIRED_FILES - set(files))
    if unlisted:
        return f"manifest.json does not list {', '.join(unlisted)}"
    for name, digest in files.items():
        if Path(name).name != name:
            return f"manifest.json names a file outside the checkpoint ({name!r})"
        file_path = path / name
        if not file_path.exists():
            return f"{name} is missing"
        if sha256_file(file_path) != digest:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint directory that verifies; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        problem = verify_checkpoint(path)
        if problem is not None:
            log.warning("Skipping checkpoint %s: %s; trying the previous one.", path, problem)
            continue
        return path
    return None


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a (verified) checkpoint directory."""
    trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    all_rng = load_file(str(path / "rng.safetensors"), device="cpu")
    rng_tensors = {k: v for k, v in all_rng.items() if "/" not in k}
    rank_rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    for rank_text, plain in trainer_state.get("rank_rng", {}).items():
        prefix = f"rank{rank_text}/"
        rank_rng[int(rank_text)] = ({k[len(prefix):]: v for k, v in all_rng.items() if k.startswith(prefix)}, plain)
    return LoadedCheckpoint(
        path=path,
        step=int(trainer_state["step"]),
        trainer_state=trainer_state,
        optimizer_state=_optimizer_from_safetensors(path / "optimizer.safetensors"),
        rng_tensors=rng_tensors,
        rank_rng=rank_rng,
    )


def load_latest_checkpoint(directory: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    path = latest_valid_checkpoint(directory)
    return None if path is None else load_checkpoint(path)
