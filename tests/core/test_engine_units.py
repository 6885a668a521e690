"""Engine pieces in-process: schedule, accumulation, non-finite steps, damaged checkpoints, hooks."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from kdcore import runner
from kdcore.checkpoint import list_checkpoints, load_latest_checkpoint
from kdcore.config import TrainerConfig
from kdcore.batches import EpochSampler
from kdcore.optimization import lr_factor
from kdcore.errors import KDUserError
from kdcore.hookspecs import hookimpl
from kdcore.interfaces import Method, StepOutput
from kdcore.io import read_jsonl
from kdcore.registry import Registry
from kdcore.resolve import resolve_run

TINY_SETS = ["trainer.progress=off"]


def test_lr_schedule_shapes() -> None:
    linear = TrainerConfig(max_steps=110, warmup_steps=10, schedule="linear", min_lr_ratio=0.1)
    assert lr_factor(0, linear) == pytest.approx(0.1) and lr_factor(9, linear) == pytest.approx(1.0)
    assert lr_factor(10, linear) == pytest.approx(1.0) and lr_factor(60, linear) == pytest.approx(0.55)
    assert lr_factor(110, linear) == pytest.approx(0.1)
    cosine = TrainerConfig(max_steps=100, schedule="cosine")
    assert lr_factor(50, cosine) == pytest.approx(0.5) and lr_factor(100, cosine) == pytest.approx(0.0)
    assert lr_factor(77, TrainerConfig(schedule="constant")) == 1.0


def test_sampler_covers_each_epoch_once_and_restores() -> None:
    sampler = EpochSampler(size=10, batch_size=3, seed=5)
    first_epoch = [i for _ in range(3) for i in sampler.next_indices()]
    assert len(set(first_epoch)) == 9  # the ragged tail (1 item) is dropped, nothing repeats
    state = sampler.state()
    expected = [sampler.next_indices() for _ in range(4)]
    again = EpochSampler(size=10, batch_size=3, seed=5)
    again.restore(state)
    assert [again.next_indices() for _ in range(4)] == expected


def _registry_with(plugin: Any) -> Registry:
    registry = Registry.discover(entry_points=False)
    registry.register_plugin(plugin, name="test-plugin", source="tests")
    return registry


def test_task_epoch_batches_drive_the_sampler_and_resume() -> None:
    def buckets(generator: torch.Generator) -> list[list[int]]:
        # two "length buckets", shuffled by the generator the sampler seeds per epoch
        short, long = [0, 1, 2, 3], [4, 5, 6]
        order = torch.randperm(2, generator=generator).tolist()
        return [[short, long][i] for i in order]

    sampler = EpochSampler(size=7, batch_size=4, seed=1, epoch_batches=buckets)
    seen = [sorted(sampler.next_indices()) for _ in range(4)]
    assert seen[0:2] in ([[0, 1, 2, 3], [4, 5, 6]], [[4, 5, 6], [0, 1, 2, 3]])
    assert sorted(map(tuple, seen[2:4])) == [(0, 1, 2, 3), (4, 5, 6)]
    state = sampler.state()
    resumed = EpochSampler(size=7, batch_size=4, seed=1, epoch_batches=buckets)
    resumed.restore(state)
    assert [resumed.next_indices() for _ in range(3)] == [sampler.next_indices() for _ in range(3)]


def test_gradient_accumulation_matches_a_large_batch(tmp_path: Path) -> None:
    registry = Registry.discover(entry_points=False)
    common = ["student.args.dropout=0", "trainer.max_steps=5", "trainer.eval_every=5", "trainer.log_every=1",
              "trainer.clip_norm=null", "data.n_train=64", *TINY_SETS]
    big = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny",
                      sets=[*common, "trainer.batch_size=32", "trainer.grad_accum=1"])
    small = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny",
                        sets=[*common, "trainer.batch_size=16", "trainer.grad_accum=2"])
    runner.run(big, registry, tmp_path / "big")
    runner.run(small, registry, tmp_path / "small")
    big_losses = [r["loss"] for r in read_jsonl(tmp_path / "big" / "log.jsonl") if r["type"] == "train"]
    small_losses = [r["loss"] for r in read_jsonl(tmp_path / "small" / "log.jsonl") if r["type"] == "train"]
    # Same 32 examples per step in the same order: equal up to float summation order.
    assert small_losses == pytest.approx(big_losses, rel=1e-5)


class _NaNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bad_steps: list[int] = []


class _NaNMethod(Method):
    """Vanilla KD whose loss is NaN at chosen steps (to test the non-finite policy)."""

    name: ClassVar[str] = "nan-at-steps"
    description: ClassVar[str] = "test method"
    Config = _NaNConfig

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"objectives": {"nll": {"name": "nll"}}}

    def training_step(self, batch: Any, step: int) -> StepOutput:
        output = super().training_step(batch, step)
        if step in self.config.bad_steps:
            return StepOutput(output.loss * float("nan"), output.parts)
        return output


class _NaNPlugin:
    @hookimpl
    def kd_register_methods(self) -> list:
        return [_NaNMethod]


def test_nonfinite_loss_skips_and_counts(tmp_path: Path) -> None:
    registry = _registry_with(_NaNPlugin())
    resolved = resolve_run(registry, task="toy", plugin="nan-at-steps", preset="tiny",
                           sets=["method.bad_steps=[3, 7]", *TINY_SETS])
    metrics = runner.run(resolved, registry, tmp_path / "run")
    assert metrics["nonfinite_steps"] == 2
    skips = [r["step"] for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["type"] == "skip"]
    assert skips == [3, 7]


def test_too_many_nonfinite_steps_stop_with_usable_checkpoint(tmp_path: Path) -> None:
    registry = _registry_with(_NaNPlugin())
    resolved = resolve_run(registry, task="toy", plugin="nan-at-steps", preset="tiny",
                           sets=[f"method.bad_steps={list(range(12, 40))}", "trainer.max_nonfinite_steps=3",
                                 *TINY_SETS])
    with pytest.raises(KDUserError, match="3 consecutive steps"):
        runner.run(resolved, registry, tmp_path / "run")
    checkpoint = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.step == 10


def test_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny",
                           sets=["trainer.keep_checkpoints=3", *TINY_SETS])
    runner.run(resolved, registry, tmp_path / "run")
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    weights = newest / "student.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated, as by a full disk
    with caplog.at_level(logging.WARNING):
        checkpoint = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.step == 30
    assert "does not match its checksum" in caplog.text


class _Recorder:
    """The student run's lifecycle events (a teacher stage, when the toy teacher is not cached yet, calls them too)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    @hookimpl
    def kd_on_train_start(self, context: Any) -> None:
        if context.state.plugin == "vanilla":
            self.events.append(("start", 0))

    @hookimpl
    def kd_on_evaluation_end(self, context: Any, step: int, metrics: dict) -> None:
        assert "accuracy" in metrics
        self.events.append(("eval", step))

    @hookimpl
    def kd_on_checkpoint_saved(self, context: Any, step: int, path: Path) -> None:
        assert (path / "manifest.json").exists()
        if context.state.plugin == "vanilla":
            self.events.append(("checkpoint", step))

    @hookimpl
    def kd_on_train_end(self, context: Any, metrics: dict) -> None:
        assert (context.out_dir / "metrics.json").exists()
        self.events.append(("end", 0))


def test_lifecycle_hooks_fire_in_order(tmp_path: Path) -> None:
    recorder = _Recorder()
    registry = _registry_with(recorder)
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=TINY_SETS)
    runner.run(resolved, registry, tmp_path / "run")
    assert recorder.events == [("start", 0), ("checkpoint", 10), ("eval", 20), ("checkpoint", 20), ("checkpoint", 30),
                               ("eval", 40), ("checkpoint", 40), ("eval", -1), ("end", 0)]


def test_saved_config_round_trips(tmp_path: Path) -> None:
    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=["trainer.lr=0.004", *TINY_SETS])
    runner.plan(resolved, tmp_path / "plan")
    from kdcore.resolve import resolve_saved_run

    again = resolve_saved_run(registry, tmp_path / "plan")
    assert again.to_dict() == resolved.to_dict()
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["trainer"]["lr"] == 0.004


def test_training_without_in_loop_evaluation_writes_no_validation_and_no_best(tmp_path: Path) -> None:
    from kdcore.trainer import Trainer

    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=TINY_SETS)
    built, splits = runner.build(resolved)
    state = Trainer(built, splits, tmp_path / "stage", registry, evaluate_in_loop=False).fit()
    assert state.step == 40 and state.best_step is None and not (tmp_path / "stage" / "best").exists()
    assert {r["type"] for r in read_jsonl(tmp_path / "stage" / "log.jsonl")} == {"start", "train"}
    stopping = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny",
                           sets=["trainer.eval_every=5", "trainer.early_stopping.patience=2", *TINY_SETS])
    with pytest.raises(KDUserError, match="trainer.early_stopping needs validations"):
        Trainer(runner.build(stopping)[0], splits, tmp_path / "other", registry, evaluate_in_loop=False)
