"""torchrun with the gloo backend on CPU: 2 processes (DDP) train exactly like 1 with the same global batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_reach_the_losses_of_one(one_process_run: Path, tmp_path: Path, torchrun,
                                                    assert_same_training) -> None:
    result = torchrun(tmp_path / "ddp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in result.stderr and "backend gloo" in result.stderr
    assert_same_training(one_process_run, tmp_path / "ddp")
    # Only rank 0 wrote: one log, one set of checkpoints, each with both ranks' random states.
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and set(state["rank_rng"]) == {"1"}


@pytest.mark.slow  # a whole torchrun launch for one message
def test_global_batch_must_split_evenly(tmp_path: Path, torchrun) -> None:
    result = torchrun(tmp_path / "odd", "--set", "trainer.batch_size=31", cwd=tmp_path)
    assert result.returncode != 0
    # Each worker prints kd's one-paragraph error and exits 2 (torchrun then adds its own failure summary).
    assert "kd: error: trainer.batch_size = 31 is the global batch" in result.stderr
    assert "exitcode  : 2" in result.stderr and f'File "{REPO / "kdcore"}' not in result.stderr
