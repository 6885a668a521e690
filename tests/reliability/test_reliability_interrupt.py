"""Ctrl-C (SIGINT) and SIGTERM: the step finishes, a checkpoint is saved, kd exits cleanly, --resume continues.

The exit code is 128 + the signal (130 for SIGINT, 143 for SIGTERM), and there is no traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcore.checkpoint import load_latest_checkpoint, verify_checkpoint
from kdcore.io import read_jsonl


@pytest.mark.parametrize("name", ["INT", pytest.param("TERM", marks=pytest.mark.slow)])
def test_signal_saves_a_checkpoint_and_resume_is_identical(name: str, tmp_path: Path, run_kd,
                                                           fault_env: dict[str, str], fault_run, straight_run: Path,
                                                           assert_identical, figures) -> None:
    out = tmp_path / "run"
    stopped = run_kd("run", *fault_run, "--out", str(out), cwd=tmp_path,
                     env={**fault_env, "KD_SIGNAL_AT_STEP": f"27:{name}"})
    signum = getattr(signal, f"SIG{name}")
    assert stopped.returncode == 128 + signum, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert f"Stopped by SIG{name} after step 27; checkpoint saved" in stopped.stderr and "--resume" in stopped.stderr
    assert verify_checkpoint(out / "checkpoints" / "step-00000027") is None  # between two regular checkpoints
    resumed = run_kd("run", "--out", str(out), "--resume", cwd=tmp_path, env=fault_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    figures.update(faults_injected=1, runs_resumed=1, identical_after_resume=1)
    assert_identical(straight_run, out)


@pytest.mark.slow  # timing-based twin of the deterministic SIGINT test above
def test_ctrl_c_from_outside_at_an_arbitrary_moment(tmp_path: Path, fault_run, figures) -> None:
    out = tmp_path / "run"
    endless = ["--set", "trainer.max_steps=1000000", "--set", "trainer.checkpoint_every=100000",
               "--set", "trainer.eval_every=100000", "--set", "trainer.log_every=5", "--set", "trainer.progress=off"]
    process = subprocess.Popen([sys.executable, "-m", "kdcore", "run", *fault_run, *endless, "--out", str(out)],
                               cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            records = read_jsonl(out / "log.jsonl")
            if records and records[-1]["step"] >= 50:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1][-3000:]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    figures.update(faults_injected=1)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    checkpoint = load_latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and checkpoint.step >= 50 and f"after step {checkpoint.step};" in stderr
    resumed = subprocess.run([sys.executable, "-m", "kdcore", "run", "--out", str(out), "--resume", "--set",
                              f"trainer.max_steps={checkpoint.step + 10}"], cwd=tmp_path, capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    figures.update(runs_resumed=1)
    steps = [r["step"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == checkpoint.step + 10  # no step logged twice, none lost
