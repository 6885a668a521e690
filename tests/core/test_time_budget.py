"""trainer.time_budget_minutes: the projection, the lowered plan in log/metrics/report, and --resume keeping it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kdcore import runner, time_budget, trainer
from kdcore.checkpoint import list_checkpoints
from kdcore.hooks import RunContext
from kdcore.hookspecs import hookimpl
from kdcore.io import read_jsonl
from kdcore.registry import Registry
from kdcore.resolve import resolve_run
from kdcore.time_budget import BudgetPlanner, steps_that_fit, validations_between

SECONDS_PER_STEP = 1.0
SECONDS_PER_VALIDATION = 5.0
# 300 planned steps, validations every 20: at one simulated second per step and 5 per validation, a one-minute
# budget fits about 60 steps, so the first projection (after 3 untimed + 20 timed steps) lowers the plan.
LONG = ["trainer.max_steps=300", "trainer.eval_every=20", "trainer.checkpoint_every=10",
        "trainer.time_budget_minutes=1", "trainer.progress=off"]


class _SimulatedClock(BudgetPlanner):
    """Counts fixed seconds per step and per validation, and projects from the simulated time spent (not this
    machine's), so the plan does not depend on this machine's speed, in a resumed process too."""

    def record_step(self, step_index: int, seconds: float) -> None:
        super().record_step(step_index, self.seconds_of(step_index))

    def seconds_of(self, step_index: int) -> float:
        return SECONDS_PER_STEP

    def record_validation(self, seconds: float) -> None:
        super().record_validation(SECONDS_PER_VALIDATION)

    def plan(self, *, done: int, planned: int, elapsed: float, ceiling: int | None = None) -> tuple[int, str] | None:
        simulated = self.simulated_elapsed(done)
        return super().plan(done=done, planned=planned, elapsed=simulated, ceiling=ceiling)

    def simulated_elapsed(self, done: int) -> float:
        validated = done // self.eval_every if self.eval_every else 0
        return sum(self.seconds_of(step) for step in range(done)) + validated * SECONDS_PER_VALIDATION


class _SlowFirstEpoch(_SimulatedClock):
    """Steps cost 3 s while the first 25 run (as when the first epoch also computes the teacher's states), then 1 s."""

    def seconds_of(self, step_index: int) -> float:
        return 3.0 if step_index < 25 else SECONDS_PER_STEP


def test_validations_still_to_come_count_multiples_and_the_last_step() -> None:
    assert validations_between(0, 100, 20) == 5
    assert validations_between(0, 90, 20) == 5  # 20, 40, 60, 80 and the last step
    assert validations_between(40, 40, 20) == 0 and validations_between(41, 60, 20) == 1
    assert validations_between(0, 100, None) == 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(done=st.integers(0, 50), planned=st.integers(51, 400), elapsed=st.floats(0, 100),
       budget=st.floats(1, 600), per_step=st.floats(0.01, 5), per_validation=st.floats(0, 30),
       eval_every=st.one_of(st.none(), st.integers(1, 100)))
def test_steps_that_fit_is_the_largest_total_within_the_budget(done: int, planned: int, elapsed: float, budget: float,
                                                               per_step: float, per_validation: float,
                                                               eval_every: int | None) -> None:
    def projected(total: int) -> float:
        return elapsed + (total - done) * per_step + validations_between(done, total, eval_every) * per_validation

    fitting = steps_that_fit(done=done, planned=planned, elapsed=elapsed, budget=budget, seconds_per_step=per_step,
                             seconds_per_validation=per_validation, eval_every=eval_every)
    fits = [total for total in range(done + 1, planned + 1) if projected(total) <= budget]
    assert fitting == (max(fits) if fits else done + 1)


def test_no_plan_change_while_the_projection_fits() -> None:
    planner = BudgetPlanner(budget_seconds=100.0, eval_every=None)
    for index in range(30):
        planner.record_step(index, 1.0)
    assert planner.plan(done=30, planned=90, elapsed=30.0) is None
    steps, reason = planner.plan(done=30, planned=200, elapsed=30.0)
    assert steps == 100 and "200 steps at 1.000 s per step" in reason and "100 steps fit" in reason


def test_a_check_rates_the_latest_steps_and_raises_a_lowered_plan_at_most_to_the_configured_steps() -> None:
    planner = BudgetPlanner(budget_seconds=600.0, eval_every=None)
    for index in range(23):  # 20 timed steps at 4 s: a slow start (teacher states computed on the first epoch)
        planner.record_step(index, 4.0)
    steps, _ = planner.plan(done=23, planned=1000, elapsed=92.0)
    assert steps == 150  # 92 s spent + 127 steps at 4 s
    for index in range(23, 63):  # then 40 steps at 1 s: the latest rate, not the average of all 60
        planner.record_step(index, 1.0)
    steps, reason = planner.plan(done=63, planned=150, elapsed=132.0, ceiling=1000)
    assert steps == 531 and "at 1.000 s per step" in reason  # 132 s + 468 steps at 1 s
    for index in range(63, 100):
        planner.record_step(index, 0.1)
    steps, _ = planner.plan(done=100, planned=531, elapsed=135.7, ceiling=1000)
    assert steps == 1000  # never above the configured steps


def test_a_lowered_plan_is_not_raised_in_its_second_half() -> None:
    planner = BudgetPlanner(budget_seconds=600.0, eval_every=None)
    for index in range(200):
        planner.record_step(index, 0.5)
    # 2,000 steps would fit at 0.1 s per step, but 200 of a 300-step plan are done: its decay has nearly ended
    for index in range(200, 230):
        planner.record_step(index, 0.1)
    assert planner.plan(done=230, planned=300, elapsed=300.0, ceiling=2000) is None
    assert planner.plan(done=100, planned=300, elapsed=50.0, ceiling=2000) is not None


def test_without_validations_the_plan_is_checked_every_hundred_steps() -> None:
    # a teacher stage: no validation, and steps that slow down after the calibration (another job took a core)
    planner = BudgetPlanner(budget_seconds=400.0, eval_every=None)
    step, elapsed, checks = 0, 0.0, []
    planned = 1000
    while step < planned:
        seconds = 0.3 if step < 50 else 0.6
        planner.record_step(step, seconds)
        step, elapsed = step + 1, elapsed + seconds
        if planner.due(after_validation=False):
            plan = planner.plan(done=step, planned=planned, elapsed=elapsed)
            checks.append(step)
            if plan is not None:
                planned = plan[0]
    assert checks[:3] == [23, 123, 223]
    # the calibration alone (0.3 s per step) kept all 1,000 steps, 550 s; the checks at 123 and 223 end it in time
    assert planned == 691 and elapsed <= 400.0


def test_a_small_gain_does_not_move_the_plan() -> None:
    planner = BudgetPlanner(budget_seconds=100.0, eval_every=None)
    for index in range(23):
        planner.record_step(index, 1.0)
    # 104 steps fit where 100 are planned: under RAISE_MARGIN, so the schedules stay as they are
    assert planner.plan(done=23, planned=100, elapsed=19.0, ceiling=300) is None
    for index in range(23, 46):
        planner.record_step(index, 1.0)
    steps, _ = planner.plan(done=46, planned=100, elapsed=30.0, ceiling=300)
    assert steps == 116  # 16% more fit: raised


def _registry(*plugins: object) -> Registry:
    registry = Registry.discover(entry_points=False)
    for number, plugin in enumerate(plugins):
        registry.register_plugin(plugin, name=f"test-plugin-{number}", source="tests")
    return registry


def test_a_run_over_its_budget_trains_fewer_steps_and_says_so(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "BudgetPlanner", _SimulatedClock)
    registry = _registry()
    metrics = runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=LONG), registry,
                         tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "log.jsonl")
    budget_records = [r for r in records if r["type"] == "budget"]
    assert budget_records and budget_records[0]["step"] == time_budget.CALIBRATION_STEPS + 3
    final = metrics["time_budget"]
    assert final["planned_steps"] == 300 and final["max_steps"] == budget_records[-1]["max_steps"]
    # At step 23 the simulated minute has 23 s of steps and 5 s of the validation at 20 spent: 22 more steps and
    # the validations at 40 and 45 fill the 60 s, and the later checks find the same.
    assert final["max_steps"] == 45, final
    assert max(r["step"] for r in records if r["type"] == "train") == final["max_steps"]
    evaluated = [r["step"] for r in records if r["type"] == "eval"]
    assert evaluated[-1] == final["max_steps"]  # the last step is validated, as for a planned end
    last_lr = [r["lr"] for r in records if r["type"] == "train"][-1]
    assert last_lr == pytest.approx(0.0, abs=1e-12)  # the linear decay ends at the new last step
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"trained {final['max_steps']} of the 300 planned steps" in report


def test_a_slow_first_epoch_lowers_the_plan_and_the_faster_steps_after_it_raise_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "BudgetPlanner", _SlowFirstEpoch)
    registry = _registry()
    sets = ["trainer.max_steps=300", "trainer.eval_every=40", "trainer.checkpoint_every=10",
            "trainer.time_budget_minutes=6", "trainer.progress=off"]
    metrics = runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=sets), registry,
                         tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "log.jsonl")
    plans = [r["max_steps"] for r in records if r["type"] == "budget"]
    # step 23, 3 s per step so far: 69 s spent, (360 - 69) / 3 = 97 more steps fit, so 120 in all; at the validation
    # of step 40 (a third of the plan) the steps since step 25 have taken 1 s, and the plan rises again, within the
    # configured 300
    assert plans[0] == 120 and len(plans) >= 2, plans
    assert plans[-1] > plans[0] and plans[-1] <= 300
    final = metrics["time_budget"]
    assert final["planned_steps"] == 300 and final["max_steps"] == plans[-1]
    assert max(r["step"] for r in records if r["type"] == "train") == final["max_steps"]
    assert [r["lr"] for r in records if r["type"] == "train"][-1] == pytest.approx(0.0, abs=1e-12)


def test_without_a_budget_nothing_is_planned(tmp_path: Path) -> None:
    registry = _registry()
    metrics = runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny",
                                     sets=["trainer.progress=off"]), registry, tmp_path / "run")
    assert "time_budget" not in metrics
    assert not [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["type"] == "budget"]


class _CrashAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def kd_on_step_end(self, context: RunContext, step: int, logs: dict[str, float]) -> None:
        if step == self.step and context.state.plugin == "vanilla":
            raise RuntimeError("crash for the test")


def test_resume_keeps_the_lowered_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer, "BudgetPlanner", _SimulatedClock)
    out = tmp_path / "run"
    crashing = _registry(_CrashAt(32))
    with pytest.raises(RuntimeError, match="crash for the test"):
        runner.run(resolve_run(crashing, task="toy", plugin="vanilla", preset="tiny", sets=LONG), crashing, out)
    saved = json.loads((list_checkpoints(out / "checkpoints")[-1] / "trainer_state.json").read_text())
    planned = saved["time_budget"]["max_steps"]
    assert planned < 300
    registry = _registry()
    # The resumed process projects with the seconds spent before the crash included: the saved plan still fits.
    metrics = runner.run(resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=LONG), registry, out,
                         resume=True)
    assert metrics["time_budget"]["max_steps"] == planned
    assert max(r["step"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train") == planned
