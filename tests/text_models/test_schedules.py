"""β schedules of ImitKD."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from kd_plugins.text.schedules import BetaSchedule


@pytest.mark.parametrize(("step", "expected"), [
    (0, 1.0),
    (250, 0.26591479484724945),   # 200 ** -0.25
    (500, 0.07071067811865475),   # 200 ** -0.5 = 1/sqrt(200)
    (750, 0.018803015465431964),  # 200 ** -0.75
    (1000, 0.005),                # 1/200
])
def test_exponential_equals_base_power_minus_t_over_T(step: int, expected: float) -> None:
    schedule = BetaSchedule(kind="exponential", base=200.0)
    assert schedule.beta(step, 1000) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("step", "expected"), [(0, 1.0), (10, 10 ** -0.5), (20, 0.1)])
def test_exponential_base_10_for_summarization(step: int, expected: float) -> None:
    assert BetaSchedule(kind="exponential", base=10.0).beta(step, 20) == pytest.approx(expected, rel=1e-12)


def test_exponential_is_the_default_with_base_200() -> None:
    schedule = BetaSchedule()
    assert schedule.kind == "exponential" and schedule.base is None
    assert schedule.beta(10, 20) == pytest.approx(200.0 ** -0.5, rel=1e-12)


def test_null_base_takes_the_task_default() -> None:
    class Summarization:
        imitation_beta_base = 10.0

    assert BetaSchedule().for_task(Summarization()).base == 10.0
    assert BetaSchedule().for_task(object()).base == 200.0
    assert BetaSchedule(base=50.0).for_task(Summarization()).base == 50.0


def test_linear_and_constant() -> None:
    linear = BetaSchedule(kind="linear", final=0.2)
    assert [linear.beta(t, 100) for t in (0, 50, 100)] == pytest.approx([1.0, 0.6, 0.2])
    constant = BetaSchedule(kind="constant", value=0.3)
    assert [constant.beta(t, 100) for t in (0, 77, 100)] == [0.3, 0.3, 0.3]


def test_progress_is_clamped_past_the_end() -> None:
    assert BetaSchedule().beta(2000, 1000) == pytest.approx(0.005)


def test_unknown_keys_and_missing_total_steps_are_rejected() -> None:
    with pytest.raises(ValidationError):
        BetaSchedule(kind="exponential", bse=10)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        BetaSchedule(kind="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total number of training steps"):
        BetaSchedule().beta(3, 0)
