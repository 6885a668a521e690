"""Checkpoints: safetensors only (no pickle), written atomically, verified on load.

A checkpoint is a directory ``step-XXXXXXXX`` holding
``student.safetensors`` (weights), ``optimizer.safetensors`` (optimizer tensors;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kdcore.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
MANIFEST = "manifest.json"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Module weights as safetensors, written through a temp file and ``os.replace``."""
    state: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, tensor in module.state_dict().items():
        # Tied weights (embeddings and LM head) share a storage, which safetensors refuses: clone repeats.
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        state[key] = tensor.clone() if pointer in seen_storage else tensor
        if pointer != -1:
            seen_storage.add(pointer)
    temp = path.with_name(f".{path.name}.tmp")
    save_file(_contiguous_cpu(state), str(temp))
    os.replace(temp, path)


def load_weights(module: torch.nn.Module, path: Path, strict: bool = True) -> None:
    state = load_file(str(path), device="cpu")
    module.load_state_dict(state, strict=strict)


def _optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, metadata


def _optimizer_from_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    state: dict[int, dict[str, Any]] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        for name in handle.keys():
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = handle.get_tensor(name)
    for index, values in json.loads(metadata.get("scalars", "{}")).items():
        state.setdefault(int(index), {}).update(values)
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


def save_checkpoint(directory: Path, step: int, student: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``<directory>/step-N`` completely or not at all; keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    staging = directory / f".{checkpoint_name(step)}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        save_weights(student, staging / "student.safetensors")
        optimizer_tensors, optimizer_metadata = _optimizer_to_safetensors(optimizer)
        save_file(_contiguous_cpu(optimizer_tensors), str(staging / "optimizer.safetensors"), metadata=optimizer_metadata)
        rng_tensors, rng_plain = capture_rng()
        save_file(_contiguous_cpu(rng_tensors), str(staging / "rng.safetensors"))
        atomic_write_json(staging / "trainer_state.json", {**trainer_state, "step": step, "rng": rng_plain})
        files = sorted(p.name for p in staging.iterdir())
        atomic_write_json(staging / MANIFEST, {"step": step, "files": {n: sha256_file(staging / n) for n in files}})
        _fsync_directory(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_directory(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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
    except (OSError, json.JSONDecodeError) as error:
        return f"manifest.json is unreadable ({error})"
    for name, digest in manifest.get("files", {}).items():
        file_path = path / name
        if not file_path.exists():
            return f"{name} is missing"
        if sha256_file(file_path) != digest:
            return f"{name} does not match its checksum"
    return None


def load_latest_checkpoint(directory: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        problem = verify_checkpoint(path)
        if problem is not None:
            log.warning("Skipping checkpoint %s: %s; trying the previous one.", path, problem)
            continue
        trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        return LoadedCheckpoint(
            path=path,
            step=int(trainer_state["step"]),
            trainer_state=trainer_state,
            optimizer_state=_optimizer_from_safetensors(path / "optimizer.safetensors"),
            rng_tensors=load_file(str(path / "rng.safetensors"), device="cpu"),
        )
    return None
