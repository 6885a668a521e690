"""FSDP2 (fully_shard) on CPU with gloo: killed with SIGKILL, resumed, and still the losses of one process."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file


def test_fsdp2_on_gloo_survives_sigkill_and_matches_one_process(one_process_run: Path, tmp_path: Path, torchrun,
                                                                  assert_same_training, fault_env: dict[str, str],
                                                                  figures) -> None:
    out = tmp_path / "fsdp"
    # Rank 0 is killed after step 9 (last checkpoint: step 6); torchrun then stops rank 1.
    killed = torchrun(out, "--set", "trainer.distributed=fsdp", cwd=tmp_path,
                      env={**fault_env, "KD_KILL_AT_STEP": "9"})
    assert killed.returncode != 0 and not (out / "metrics.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000006"]
    resumed = torchrun(out, cwd=tmp_path, env=fault_env, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    figures.update(faults_injected=1, runs_resumed=1, identical_after_resume=1)
    assert_same_training(one_process_run, out)
    # The sharded run's checkpoint holds the full (gathered) student, readable without torch.distributed.
    weights = load_file(str(out / "checkpoints" / "step-00000012" / "student.safetensors"))
    reference = load_file(str(one_process_run / "checkpoints" / "step-00000012" / "student.safetensors"))
    assert weights.keys() == reference.keys()
    assert all(weights[k].shape == reference[k].shape for k in weights)
