"""Hooks that act: the typed run state, a clean stop on request, early stopping on the task's metric, progress lines."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kdcore import runner
from kdcore.checkpoint import list_checkpoints
from kdcore.config import TrainerConfig
from kdcore.early_stopping import STATE_KEY, EarlyStopping
from kdcore.errors import KDUserError
from kdcore.hooks import RunContext, RunControl, RunState
from kdcore.hookspecs import hookimpl
from kdcore.io import read_jsonl
from kdcore.registry import Registry
from kdcore.resolve import resolve_run

QUIET = ["trainer.progress=off"]
# Validations every 5 steps; min_delta 1.0 on accuracy (a value in [0, 1]) makes every validation after the first a
# non-improvement, so patience 2 stops the run at step 15 whatever the student learns.
PLATEAU = ["trainer.max_steps=40", "trainer.eval_every=5", "trainer.checkpoint_every=10",
           "trainer.early_stopping.patience=2", "trainer.early_stopping.min_delta=1.0", *QUIET]


def _logged(out: Path) -> list[dict[str, Any]]:
    """log.jsonl without the measured throughput, the one value that differs between two identical runs."""
    return [{key: value for key, value in record.items() if key != "examples_per_second"}
            for record in read_jsonl(out / "log.jsonl")]


def _registry(*plugins: Any) -> Registry:
    registry = Registry.discover(entry_points=False)
    for number, plugin in enumerate(plugins):
        registry.register_plugin(plugin, name=f"test-plugin-{number}", source="tests")
    return registry


def _state(greater_is_better: bool = True) -> RunState:
    return RunState(out_dir=Path("."), task="toy", plugin="vanilla", metric="accuracy",
                    greater_is_better=greater_is_better, max_steps=100)


def _evaluations(stopping: EarlyStopping, values: list[float], greater_is_better: bool = True) -> RunContext:
    context = RunContext(_state(greater_is_better), RunControl(), components=None, config=None)
    for number, value in enumerate(values, start=1):
        if context.control.should_stop:
            break
        stopping.kd_on_evaluation_end(context=context, step=10 * number, metrics={"accuracy": value})
    return context


def test_early_stopping_counts_validations_without_improvement_in_the_metric_s_direction() -> None:
    rising = _evaluations(EarlyStopping(patience=2), [0.5, 0.6, 0.6, 0.7, 0.65, 0.7])
    assert rising.control.stop_reason is not None and "0.7 at step 40" in rising.control.stop_reason
    assert rising.state.hook_state[STATE_KEY]["evaluations_without_improvement"] == 2

    assert not _evaluations(EarlyStopping(patience=2), [0.5, 0.6, 0.7, 0.8]).control.should_stop
    # min_delta: a gain of 0.05 is not enough.
    assert _evaluations(EarlyStopping(patience=2, min_delta=0.1), [0.5, 0.55, 0.58]).control.should_stop
    # a loss-like metric: falling is better.
    falling = _evaluations(EarlyStopping(patience=1), [3.0, 2.0, 2.5], greater_is_better=False)
    assert falling.control.should_stop and "has not fallen" in falling.control.stop_reason
    assert not _evaluations(EarlyStopping(patience=1), [3.0, 2.0, 1.0], greater_is_better=False).control.should_stop


def test_the_final_test_evaluation_does_not_count() -> None:
    stopping = EarlyStopping(patience=1)
    context = _evaluations(stopping, [0.5])
    stopping.kd_on_evaluation_end(context=context, step=-1, metrics={"accuracy": 0.1})
    assert not context.control.should_stop


def test_first_stop_request_wins() -> None:
    control = RunControl()
    control.request_stop("first")
    control.request_stop("second")
    assert control.should_stop and control.stop_reason == "first"


@pytest.mark.parametrize("sets", [
    {"max_steps": 40, "eval_every": 20, "early_stopping": {"patience": 1}},   # 1 validation before the end
    {"max_steps": 100, "eval_every": 100, "early_stopping": {"patience": 3}},  # none
])
def test_early_stopping_that_can_never_act_is_refused(sets: dict[str, Any]) -> None:
    with pytest.raises(KDUserError, match="trainer.early_stopping.patience .* can never stop this run"):
        TrainerConfig.model_validate(sets)


@pytest.mark.parametrize("bad", ["trainer.early_stopping.patience=0", "trainer.early_stopping.min_delta=-0.1",
                                 "trainer.early_stopping.paitence=2"])
def test_bad_early_stopping_values_are_config_errors(bad: str) -> None:
    with pytest.raises(KDUserError, match="trainer.early_stopping"):
        resolve_run(_registry(), task="toy", plugin="vanilla", preset="tiny",
                    sets=["trainer.eval_every=5", "trainer.early_stopping.patience=2", bad])


def test_early_stopping_without_in_loop_validation_exits_2_at_planning(tmp_path: Path, run_kd) -> None:
    result = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--dry-run",
                    "--set", "trainer.early_stopping.patience=3", "--out", str(tmp_path / "plan"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "can never stop this run" in result.stderr and "Traceback" not in result.stderr


def test_toy_run_stops_on_a_plateau_and_writes_its_reports(tmp_path: Path, run_kd) -> None:
    out = tmp_path / "run"
    sets = [argument for value in PLATEAU for argument in ("--set", value)]
    result = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", *sets, "--out", str(out),
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    stopped = metrics["stopped_early"]
    assert f"Stopped early at step 15 of 40: {stopped['reason']}." in result.stdout
    assert stopped["step"] == 15 and stopped["max_steps"] == 40 and "early stopping" in stopped["reason"]
    assert f"Stopped early at step 15 of 40: {stopped['reason']}" in (out / "report.md").read_text()
    records = read_jsonl(out / "log.jsonl")
    assert records[-1] == {"type": "stop", "step": 15, "reason": stopped["reason"]}
    assert max(r["step"] for r in records) == 15
    assert [r["step"] for r in records if r["type"] == "eval"] == [5, 10, 15]
    assert list_checkpoints(out / "checkpoints")[-1].name == "step-00000015"
    assert metrics["best_step"] in (5, 10, 15) and (out / "best" / "student.safetensors").exists()
    assert set(metrics["student"]) >= {"accuracy", "nll"}  # the final test evaluation of the best student ran


class _CrashAt:
    """Fails the run after optimiser step ``step`` (a crash between two checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def kd_on_step_end(self, context: RunContext, step: int, logs: dict[str, float]) -> None:
        if step == self.step and context.state.plugin == "vanilla":  # not in the toy teacher's stage
            raise RuntimeError("crash for the test")


def test_resume_keeps_the_patience_counter(tmp_path: Path) -> None:
    straight = runner.run(resolve_run(_registry(), task="toy", plugin="vanilla", preset="tiny", sets=PLATEAU),
                          _registry(), tmp_path / "straight")
    out = tmp_path / "crashed"
    crashing = _registry(_CrashAt(12))
    with pytest.raises(RuntimeError, match="crash for the test"):
        runner.run(resolve_run(crashing, task="toy", plugin="vanilla", preset="tiny", sets=PLATEAU), crashing, out)
    saved = json.loads((list_checkpoints(out / "checkpoints")[-1] / "trainer_state.json").read_text())
    assert saved["hook_state"][STATE_KEY]["evaluations_without_improvement"] == 1  # the validation at step 10
    registry = _registry()
    resumed = runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=PLATEAU), registry,
                         out, resume=True)
    # Without the counter the resumed run would need two more validations and stop at 20.
    assert resumed["stopped_early"] == straight["stopped_early"] and resumed["student"] == straight["student"]
    assert _logged(out) == _logged(tmp_path / "straight")

    # The early-stopping hook is registered only while its run trains.
    assert registry.plugin_manager.get_plugin("kd-early-stopping") is None
    # Resuming a run that stopped early trains no further: it ends where it stopped.
    again = runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=PLATEAU), registry, out,
                       resume=True)
    assert again["stopped_early"] == straight["stopped_early"] and again["student"] == straight["student"]
    assert _logged(out) == _logged(tmp_path / "straight")


class _StopAt:
    """Requests a stop after optimiser step ``step`` and records what the typed state said along the way."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: list[tuple[int, int, float | None, Path]] = []

    @hookimpl
    def kd_on_step_end(self, context: RunContext, step: int, logs: dict[str, float]) -> None:
        state = context.state
        if state.plugin != "vanilla":  # the toy teacher's stage, when its teacher is not cached yet
            return
        self.seen.append((state.step, state.max_steps, state.best_metric, state.out_dir))
        if step == self.step:
            context.control.request_stop(f"test plugin asked at step {step}")


@pytest.mark.parametrize("at", [7, 40])
def test_a_hook_stops_a_run_cleanly(tmp_path: Path, at: int) -> None:
    stopper = _StopAt(at)
    registry = _registry(stopper)
    out = tmp_path / "run"
    metrics = runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=QUIET), registry, out)
    assert stopper.seen[0] == (1, 40, None, out) and stopper.seen[-1][0] == at
    last_checkpoint = list_checkpoints(out / "checkpoints")[-1].name
    if at < 40:
        assert metrics["stopped_early"] == {"step": at, "max_steps": 40, "reason": f"test plugin asked at step {at}"}
        assert last_checkpoint == f"step-{at:08d}"
    else:  # a stop requested at the last step changes nothing
        assert "stopped_early" not in metrics and last_checkpoint == "step-00000040"
    assert (out / "metrics.json").exists() and (out / "report.md").exists()


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("KD_PROGRESS", raising=False)
    monkeypatch.setenv("KD_PROGRESS_INTERVAL", "1e-9")  # a line after every step
    registry = _registry()
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=["trainer.progress=auto"])
    with caplog.at_level(logging.INFO, logger="kd.progress"):
        runner.run(resolved, registry, tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records
             if r.name == "kd.progress" and r.getMessage().startswith("toy/vanilla:")]  # not the teacher stage's
    assert lines[0].startswith("toy/vanilla: step 1/40 (2%), ") and "elapsed" in lines[0] and "left" in lines[0]
    assert "loss " in lines[0]
    assert lines[-1].startswith("toy/vanilla: finished at step 40/40 after ")
