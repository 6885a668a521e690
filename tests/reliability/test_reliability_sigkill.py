"""SIGKILL at many moments of one run (before the first checkpoint, inside checkpoint writes before the manifest,
after the manifest but before the rename, after the rename, right after a validation), each followed by
``--resume``: the run ends bit-identical to an uninterrupted one.

(tests/core/test_engine.py covers a kill between two checkpoints, at step 27.)
"""
from __future__ import annotations

import signal
from pathlib import Path

from kdcore.checkpoint import list_checkpoints

# (environment that arms the fault, checkpoint steps on disk after the kill). One run is killed over and
# over: each entry is the next attempt, resumed from whatever the previous crash left.
CRASHES = [
    ({"KD_KILL_AT_STEP": "4"}, []),                                          # before any checkpoint exists
    ({"KD_CHECKPOINT_FAULT": "10:student-written:kill"}, []),                # inside the first checkpoint write
    ({"KD_KILL_AT_EVAL": "20"}, [10]),                                       # after validation, before best/
    ({"KD_CHECKPOINT_FAULT": "30:manifest-written:kill"}, [10, 20]),         # complete but not yet renamed
    ({"KD_CHECKPOINT_FAULT": "40:renamed:kill"}, [20, 30, 40]),              # renamed, old one not yet pruned
]


def test_a_run_killed_five_times_ends_identical(tmp_path: Path, run_kd, fault_env: dict[str, str], fault_run,
                                                straight_run: Path, assert_identical, figures) -> None:
    out = tmp_path / "run"
    first = True
    for fault, on_disk in CRASHES:
        args = [*fault_run, "--out", str(out)] if first else ["--out", str(out), "--resume"]
        result = run_kd("run", *args, cwd=tmp_path, env={**fault_env, **fault})
        assert result.returncode == -signal.SIGKILL, (fault, result.returncode, result.stderr[-2000:])
        assert not (out / "metrics.json").exists()
        found = [int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints")]
        assert found == on_disk, fault
        figures.update(faults_injected=1)
        if not first:
            figures.update(runs_resumed=1)
        first = False
    final = run_kd("run", "--out", str(out), "--resume", cwd=tmp_path, env=fault_env)
    assert final.returncode == 0, final.stderr[-3000:]
    figures.update(runs_resumed=1, identical_after_resume=1)
    assert_identical(straight_run, out)
    # The half-written staging directories of the crashed writes are gone once the run completed.
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

