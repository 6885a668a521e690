"""NaN/inf losses through the real CLI: skipped and counted; K in a row stop the run with a usable checkpoint.

(In-process unit versions are in tests/core/test_engine_units.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcore.checkpoint import load_latest_checkpoint
from kdcore.io import read_jsonl


def _nan_run(fault_run: list[str]) -> list[str]:
    return [("fault-nan" if arg == "vanilla" else arg) for arg in fault_run]


@pytest.mark.slow  # tests/core/test_engine_units.py checks skip counting in-process
def test_isolated_inf_and_nan_steps_are_skipped_and_counted(tmp_path: Path, run_kd, fault_env: dict[str, str],
                                                             fault_run, figures) -> None:
    out = tmp_path / "run"
    result = run_kd("run", *_nan_run(fault_run), "--set", "method.bad_steps=[5, 6, 33]", "--set", "method.value=inf",
                    "--out", str(out), cwd=tmp_path, env=fault_env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures.update(faults_injected=3)
    assert json.loads((out / "metrics.json").read_text())["nonfinite_steps"] == 3
    assert [r["step"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "skip"] == [5, 6, 33]
    assert result.stderr.count("non-finite loss, step skipped") == 3


def test_k_consecutive_nan_steps_stop_then_resume_completes(tmp_path: Path, run_kd, fault_env: dict[str, str],
                                                            fault_run, straight_run: Path, assert_identical,
                                                            figures) -> None:
    out = tmp_path / "run"
    stopped = run_kd("run", *_nan_run(fault_run), "--set", f"method.bad_steps={list(range(12, 40))}",
                     "--set", "trainer.max_nonfinite_steps=3", "--out", str(out), cwd=tmp_path, env=fault_env)
    figures.update(faults_injected=3)
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    assert "NaN or infinite for 3 consecutive steps" in stopped.stderr and "stopping at step 14" in stopped.stderr
    assert load_latest_checkpoint(out / "checkpoints").step == 10
    # The checkpoint is usable: with the cause removed, --resume finishes the run as if nothing happened.
    resumed = run_kd("run", "--out", str(out), "--resume", "--set", "method.bad_steps=[]", cwd=tmp_path,
                     env=fault_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    figures.update(runs_resumed=1, identical_after_resume=1)
    assert_identical(straight_run, out)
