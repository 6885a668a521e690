"""Faults under torchrun (2 gloo processes): a NaN on one rank only, Ctrl-C on rank 0, then --resume.

Both ranks must skip the same step (else one would wait forever in the gradient
all-reduce) and stop after the same step on a signal; the resumed run ends with the
losses of one process given the same faults.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kdcore.checkpoint import list_checkpoints
from kdcore.io import read_jsonl

NAN_ON_RANK_1 = ["--plugin", "fault-nan", "--set", "method.bad_steps=[3]"]


@pytest.mark.slow  # three launches (~35 s); the 2-process equality test stays in the quick suite
def test_nan_on_one_rank_and_ctrl_c_then_resume(tmp_path: Path, torchrun, run_kd, fault_env: dict[str, str],
                                                assert_same_training, dist_sets: list[str], figures) -> None:
    # Reference: one process, NaN at step 3 (all of its one rank), no signal.
    reference = tmp_path / "one"
    single = run_kd("run", "--task", "toy", "--preset", "tiny", *NAN_ON_RANK_1,
                    *[a for option in dist_sets for a in ("--set", option)], "--out", str(reference),
                    cwd=tmp_path, env=fault_env)
    assert single.returncode == 0, single.stderr[-3000:]

    out = tmp_path / "two"
    stopped = torchrun(out, *NAN_ON_RANK_1, "--set", "method.ranks=[1]", cwd=tmp_path,
                       env={**fault_env, "KD_SIGNAL_AT_STEP": "9:INT"})
    figures.update(faults_injected=2)
    assert stopped.returncode != 0
    assert stopped.stderr.count("Stopped by SIGINT after step 9; checkpoint saved") == 2  # both ranks, same step
    assert [int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints")] == [6, 9]
    assert [r["step"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "skip"] == [3]
    resumed = torchrun(out, cwd=tmp_path, env=fault_env, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    figures.update(runs_resumed=1, identical_after_resume=1)
    assert_same_training(reference, out)
