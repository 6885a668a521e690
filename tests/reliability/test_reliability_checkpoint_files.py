"""Checkpoint files under faults: a crash at every write stage, every kind of damage, a full disk.

In-process and fast: each case writes real checkpoints of a small model with
:func:`kdcore.checkpoint.save_checkpoint`, then checks what ``--resume`` would load.
The end-to-end case (a damaged newest checkpoint, then ``kd run --resume``) is at the end.
"""
from __future__ import annotations

import errno
import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch

from kdcore import checkpoint as ckpt
from kdcore.checkpoint import (
    CHECKPOINT_STAGES, list_checkpoints, load_latest_checkpoint, save_checkpoint, verify_checkpoint,
)


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


def _save(directory: Path, step: int, keep: int = 2) -> Path:
    model, optimizer = _model_and_optimizer(step)
    return save_checkpoint(directory, step, model, optimizer, {"note": step}, keep)


class _Crash(BaseException):
    """Stands for the process dying: nothing after the raise point runs in the writer."""


@pytest.mark.parametrize("stage", CHECKPOINT_STAGES)
def test_a_crash_at_any_write_stage_leaves_a_loadable_checkpoint(tmp_path: Path, stage: str, figures) -> None:
    directory = tmp_path / "checkpoints"
    _save(directory, 10)
    _save(directory, 20)
    snapshot = tmp_path / "disk-at-crash"

    def crash(seen_stage: str, step: int, path: Path) -> None:  # noqa: ARG001
        if seen_stage == stage:
            # What a SIGKILL at this instant leaves on disk (the writer's cleanup never runs after a kill).
            shutil.copytree(directory, snapshot, symlinks=True)
            raise _Crash

    ckpt._write_observers.append(crash)
    try:
        with pytest.raises(_Crash):
            _save(directory, 30)
    finally:
        ckpt._write_observers.remove(crash)
    figures.update(faults_injected=1)
    loaded = load_latest_checkpoint(snapshot)
    renamed = CHECKPOINT_STAGES.index(stage) >= CHECKPOINT_STAGES.index("renamed")
    assert loaded is not None and loaded.step == (30 if renamed else 20)
    assert loaded.trainer_state["note"] == loaded.step
    # Every directory --resume could pick verifies; the unfinished one is only ever a hidden staging dir.
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(snapshot))


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "one byte flipped": _flip_middle_byte,
    "emptied": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
}
FILES = ["student.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json", "manifest.json"]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path: Path, name: str, damage: str,
                                                               caplog: pytest.LogCaptureFixture, figures) -> None:
    directory = tmp_path / "checkpoints"
    _save(directory, 10)
    newest = _save(directory, 20)
    DAMAGE[damage](newest / name)
    figures.update(damaged_checkpoints=1)
    with caplog.at_level(logging.WARNING, logger="kdcore.checkpoint"):
        loaded = load_latest_checkpoint(directory)
    assert loaded is not None and loaded.step == 10
    assert "Skipping checkpoint" in caplog.text and "step-00000020" in caplog.text


def test_a_manifest_that_is_not_json_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "checkpoints"
    _save(directory, 10)
    (_save(directory, 20) / "manifest.json").write_text("{ not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="kdcore.checkpoint"):
        assert load_latest_checkpoint(directory).step == 10
    assert "manifest.json is unreadable" in caplog.text


@pytest.mark.parametrize("stage", [s for s in CHECKPOINT_STAGES if s not in ("renamed", "pruned")])
def test_a_full_disk_while_writing_keeps_the_previous_checkpoint(tmp_path: Path, stage: str, figures) -> None:
    directory = tmp_path / "checkpoints"
    _save(directory, 10)
    before = {p.name: p.read_bytes() for p in (directory / "step-00000010").iterdir()}

    def full_disk(seen_stage: str, step: int, path: Path) -> None:  # noqa: ARG001
        if seen_stage == stage:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    ckpt._write_observers.append(full_disk)
    try:
        with pytest.raises(OSError) as caught:
            _save(directory, 20)
    finally:
        ckpt._write_observers.remove(full_disk)
    figures.update(faults_injected=1)
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in directory.iterdir()] == ["step-00000010"]  # no staging directory left behind
    assert {p.name: p.read_bytes() for p in (directory / "step-00000010").iterdir()} == before
    assert load_latest_checkpoint(directory).step == 10


def test_resume_after_a_corrupted_checkpoint_uses_the_previous_one(tmp_path: Path, run_kd, fault_env: dict[str, str],
                                                                   fault_run, straight_run: Path, assert_identical,
                                                                   figures) -> None:
    out = tmp_path / "run"
    killed = run_kd("run", *fault_run, "--out", str(out), cwd=tmp_path, env={**fault_env, "KD_KILL_AT_STEP": "27"})
    assert killed.returncode == -signal.SIGKILL
    _flip_middle_byte(out / "checkpoints" / "step-00000020" / "optimizer.safetensors")  # bit rot
    resumed = run_kd("run", "--out", str(out), "--resume", cwd=tmp_path, env=fault_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping checkpoint" in resumed.stderr and "optimizer.safetensors does not match its checksum" in resumed.stderr
    assert "Resumed from" in resumed.stderr and "step-00000010" in resumed.stderr
    figures.update(faults_injected=2, damaged_checkpoints=1, runs_resumed=1, identical_after_resume=1)
    assert_identical(straight_run, out)
