"""objectives.<label>.active: an objective counts only in its span of training progress t/T."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdcore.interfaces import (
    ObjectiveOutput, Signals, WeightedObjective, combine_objectives, objective_summary, training_progress,
)
from kdcore.resolve import uncovered_progress


class Constant:
    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def __call__(self, student: Signals, teacher: Signals, batch: object) -> ObjectiveOutput:
        self.calls += 1
        return ObjectiveOutput(torch.tensor(self.value), {})


def test_only_the_objectives_active_at_the_progress_are_computed() -> None:
    warm, main = Constant(2.0), Constant(5.0)
    objectives = [WeightedObjective("sft", warm, 1.0, 0.0, 0.3),  # type: ignore[arg-type]
                  WeightedObjective("kd", main, 0.5, 0.3, 1.0)]  # type: ignore[arg-type]
    early = combine_objectives(objectives, Signals(), Signals(), {}, training_progress(2, 10))
    late = combine_objectives(objectives, Signals(), Signals(), {}, training_progress(3, 10))
    assert (float(early.loss), early.parts) == (2.0, {"sft": 2.0})
    assert (float(late.loss), late.parts) == (2.5, {"kd": 5.0})
    assert (warm.calls, main.calls) == (1, 1)  # an inactive objective is not computed
    everything = combine_objectives(objectives, Signals(), Signals(), {})
    assert float(everything.loss) == 4.5  # no progress given: every objective counts


def test_progress_is_clamped_and_zero_before_the_engine_sets_the_steps() -> None:
    assert [training_progress(step, 4) for step in (0, 1, 3, 9)] == [0.0, 0.25, 0.75, 1.0]
    assert training_progress(5, 0) == 0.0
    last = WeightedObjective("kd", Constant(1.0), 1.0, 0.5, 1.0)  # type: ignore[arg-type]
    assert last.active_at(1.0) and not last.active_at(0.49)


@pytest.mark.parametrize(("spans", "gap"), [
    ([(0.0, 1.0)], None),
    ([(0.0, 0.3), (0.3, 1.0)], None),
    ([(0.3, 1.0), (0.0, 0.5)], None),  # overlapping, any order
    ([(0.2, 1.0)], (0.0, 0.2)),
    ([(0.0, 0.4), (0.5, 1.0)], (0.4, 0.5)),
    ([(0.0, 0.9)], (0.9, 1.0)),
    ([], (0.0, 1.0)),
])
def test_uncovered_progress(spans: list[tuple[float, float]], gap: tuple[float, float] | None) -> None:
    assert uncovered_progress(spans) == gap


@given(st.lists(st.tuples(st.floats(0, 0.99), st.floats(0.01, 1)).filter(lambda s: s[0] < s[1]), max_size=5),
       st.floats(0, 0.999))
def test_a_progress_outside_every_span_lies_in_the_reported_gap(spans: list[tuple[float, float]],
                                                                 progress: float) -> None:
    covered = any(start <= progress < stop for start, stop in spans)
    gap = uncovered_progress(spans)
    if not covered:
        assert gap is not None  # something is uncovered, so a gap is reported
    if gap is None:
        assert covered


def test_the_plan_and_the_log_name_the_spans() -> None:
    assert objective_summary("jsd", 1.0, 0.3, 1.0) == {"name": "jsd", "weight": 1.0,
                                                       "active": {"start": 0.3, "stop": 1.0}}
    assert objective_summary("nll", 0.5, 0.0, 1.0) == {"name": "nll", "weight": 0.5}
