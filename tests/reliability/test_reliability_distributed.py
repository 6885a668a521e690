"""torchrun with the gloo backend on CPU: 2 processes (DDP) train exactly like 1 with the same global batch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcore.io import read_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_two_gloo_processes_reach_the_losses_of_one(one_process_run: Path, tmp_path: Path, torchrun,
                                                    assert_same_training) -> None:
    # With a tracker on (it does not change training): under torchrun only rank 0 reports.
    result = torchrun(tmp_path / "ddp", "--set", "trainer.report_to=[tensorboard]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2" in result.stderr and "backend gloo" in result.stderr
    assert_same_training(one_process_run, tmp_path / "ddp")
    # Only rank 0 wrote: one log, one set of checkpoints, each with both ranks' random states.
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000012" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and set(state["rank_rng"]) == {"1"}
    # ... and one TensorBoard event file, whose training losses are log.jsonl's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((tmp_path / "ddp" / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path / "ddp" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = {record["step"]: record["loss"] for record in read_jsonl(tmp_path / "ddp" / "log.jsonl")
              if record["type"] == "train"}
    assert {point.step: point.value for point in events.Scalars("train/loss")} == pytest.approx(logged, rel=1e-6)


@pytest.mark.slow  # a whole torchrun launch for one message
def test_global_batch_must_split_evenly(tmp_path: Path, torchrun) -> None:
    result = torchrun(tmp_path / "odd", "--set", "trainer.batch_size=31", cwd=tmp_path)
    assert result.returncode != 0
    # Each worker prints kd's one-paragraph error and exits 2 (torchrun then adds its own failure summary).
    assert "kd: error: trainer.batch_size = 31 is the global batch" in result.stderr
    assert "exitcode  : 2" in result.stderr and f'File "{REPO / "kdcore"}' not in result.stderr


# Slow (27 s, two torchrun launches): CI keeps the DDP training run above and the one-process teacher-stage resume
# of tests/text_tasks/test_text_task_teacher_stage.py.
@pytest.mark.slow
def test_two_gloo_processes_train_the_toy_teacher_stage_together(tmp_path: Path, torchrun, dist_sets: list[str],
                                                                 fault_env: dict[str, str]) -> None:
    """Cold cache under torchrun: both ranks train the teacher stage (each half of every batch of 128), rank 0
    checkpoints it; killed and run again, the stage continues, and the cached teacher is the one-process one."""
    from kdcore.interfaces import BuildContext
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    env = {**fault_env, "KD_CACHE_DIR": str(tmp_path / "cache"), "KD_FAULT_STAGE": "teacher-stage"}
    out = tmp_path / "ddp"
    # The tiny preset's stage: 150 steps, a checkpoint every 100; rank 0 is killed after step 120.
    killed = torchrun(out, cwd=tmp_path, env={**env, "KD_KILL_AT_STEP": "120"})
    assert killed.returncode != 0 and "data-parallel on 2 processes" in killed.stderr, killed.stderr[-3000:]
    (partial,) = (tmp_path / "cache" / "toy").glob("teacher-*.partial")
    assert not (tmp_path / "cache" / "toy" / partial.name.removesuffix(".partial")).exists()
    records = read_jsonl(partial / "log.jsonl")
    assert records[0]["type"] == "start" and records[0]["world_size"] == 2
    state = json.loads((partial / "checkpoints" / "step-00000100" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and set(state["rank_rng"]) == {"1"}

    resumed = torchrun(out, cwd=tmp_path, env=env, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Teacher stage: continuing from its checkpoint at step 100 of 150" in resumed.stderr
    assert not partial.exists()
    cached = load_file(str(partial.with_name(partial.name.removesuffix(".partial")) / "teacher.safetensors"))

    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=dist_sets)
    alone = tmp_path / "one-process"
    context = BuildContext(task=resolved.task_cls(resolved.data_config, alone), cache_dir=alone,
                           device=torch.device("cpu"), seed=0)
    resolved.teacher_factory().build(resolved.teacher_config, context)
    (reference_path,) = (alone / "toy").glob("teacher-*/teacher.safetensors")
    assert reference_path.parent.name == partial.name.removesuffix(".partial")  # the same cache key
    reference = load_file(str(reference_path))
    # Not bitwise: the same examples, but the batch mean is summed in another order (two halves of 64, averaged by
    # DDP's all-reduce), so each gradient differs by float rounding, which 150 Adam steps carry along (measured:
    # at most about 1e-6 on any weight).
    assert reference.keys() == cached.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(cached[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_a_factory_built_on_rank_0_first_cannot_run_a_teacher_stage_under_torchrun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other ranks would be waiting at a barrier, not training: refused before the first collective."""
    from kd_tasks.toy import ToyMLPTeacherFactory
    from kdcore import distributed
    from kdcore.config import TrainerConfig
    from kdcore.teacher_stage import train_teacher_stage

    class RankZeroFirstTeacher(ToyMLPTeacherFactory):
        builds_on_all_ranks = False

    monkeypatch.setattr(distributed, "_STATE", distributed.DistributedState(rank=0, world_size=2, backend="gloo"))
    with pytest.raises(TypeError, match="RankZeroFirstTeacher runs a teacher stage.*builds_on_all_ranks = True"):
        train_teacher_stage(None, None, RankZeroFirstTeacher, None, TrainerConfig(),  # type: ignore[arg-type]
                            train=[], seed=0, cache_entry=tmp_path / "teacher", device=torch.device("cpu"))
    assert not (tmp_path / "teacher.partial").exists()
