"""A full disk or an unwritable output directory: exit code 2, one clear paragraph, earlier checkpoints intact."""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdcore.checkpoint import load_latest_checkpoint, verify_checkpoint

def test_full_disk_during_a_checkpoint_is_a_clear_error_and_resume_recovers(
        tmp_path: Path, run_kd, fault_env: dict[str, str], fault_run, straight_run: Path, assert_identical,
        figures) -> None:
    out = tmp_path / "run"
    full = run_kd("run", *fault_run, "--out", str(out), cwd=tmp_path,
                  env={**fault_env, "KD_CHECKPOINT_FAULT": "20:optimizer-written:enospc"})
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    assert "Could not write checkpoint step 20" in full.stderr and "No space left on device" in full.stderr
    assert "earlier checkpoints are intact" in full.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000010"]  # no half-written staging dir
    assert verify_checkpoint(out / "checkpoints" / "step-00000010") is None
    resumed = run_kd("run", "--out", str(out), "--resume", cwd=tmp_path, env=fault_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    figures.update(faults_injected=1, runs_resumed=1, identical_after_resume=1)
    assert_identical(straight_run, out)


@pytest.fixture
def lock() -> Iterator[object]:
    """``lock(dir)`` makes a directory unwritable; undone at teardown.

    An ordinary user gets ``chmod 555``. Root ignores permission bits, so as root the
    directory is made immutable (``chattr +i``), which refuses new entries even to root.
    """
    locked: list[Path] = []

    def apply(path: Path) -> None:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
                pytest.skip("running as root without chattr +i: cannot make a directory unwritable")
        else:
            path.chmod(0o555)
        locked.append(path)

    yield apply
    for path in locked:
        unlock(path)


def unlock(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=False)
    else:
        path.chmod(0o755)


DENIED = ("Permission denied", "Operation not permitted")


@pytest.mark.slow  # three runs; test_unwritable_output_directory is the quick version
def test_checkpoint_directory_made_unwritable_mid_run(tmp_path: Path, run_kd, fault_run, lock, figures) -> None:
    out = tmp_path / "run"
    short = ["--set", "trainer.max_steps=20", "--set", "trainer.progress=off"]
    first = run_kd("run", *fault_run, *short, "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    lock(out / "checkpoints")
    blocked = run_kd("run", "--out", str(out), "--resume", "--set", "trainer.max_steps=40", cwd=tmp_path)
    figures.update(faults_injected=1)
    assert blocked.returncode == 2, blocked.stderr[-3000:]
    assert "Traceback" not in blocked.stderr and any(reason in blocked.stderr for reason in DENIED)
    assert "Could not write checkpoint step 30" in blocked.stderr
    checkpoint = load_latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint.step == 20  # the previous checkpoint is intact
    unlock(out / "checkpoints")
    again = run_kd("run", "--out", str(out), "--resume", "--set", "trainer.max_steps=40", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    figures.update(runs_resumed=2)
    assert load_latest_checkpoint(out / "checkpoints").step == 40


def test_output_directory_that_cannot_be_created(tmp_path: Path, run_kd, fault_run) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n", encoding="utf-8")
    result = run_kd("run", *fault_run, "--out", str(blocker / "run"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not writable" in result.stderr and "a-file" in result.stderr


def test_unwritable_output_directory(tmp_path: Path, run_kd, fault_run, lock) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    lock(locked)
    result = run_kd("run", *fault_run, "--out", str(locked / "run"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not writable" in result.stderr and any(reason in result.stderr for reason in DENIED)
