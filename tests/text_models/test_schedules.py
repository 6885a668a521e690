"""β schedules of ImitKD."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from kd_plugins.text.schedules import AdaptiveFraction, BetaSchedule


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


def observe_all(schedule: BetaSchedule, values: list[float], greater_is_better: bool) -> list[float]:
    state = AdaptiveFraction.start(schedule)
    fractions = []
    for value in values:
        state.observe(value, schedule, greater_is_better)
        fractions.append(round(state.fraction, 6))
    return fractions


def test_adaptive_reference_is_the_previous_validation_or_the_last_raise() -> None:
    losses = [3.0, 2.0, 2.5, 2.2, 2.4, 2.6, 2.7]  # lower is better
    # previous: 2.0 -> 2.5, 2.2 -> 2.4, 2.4 -> 2.6 and 2.6 -> 2.7 are worse.
    assert observe_all(BetaSchedule(kind="adaptive"), losses, False) == [0.0, 0.0, 0.1, 0.1, 0.2, 0.3, 0.4]
    # last_raise (DistiLLM's code): the reference stays 3.0, which no later loss exceeds.
    assert observe_all(BetaSchedule(kind="adaptive", compare_with="last_raise"), losses, False) == [0.0] * 7
    rising = [1.0, 1.5, 1.4, 1.6, 1.7]
    # last_raise: 1.0 -> 1.5 raises and becomes the reference; 1.6 is worse than 1.5, 1.7 than 1.6.
    assert observe_all(BetaSchedule(kind="adaptive", compare_with="last_raise"), rising, False) == \
        [0.0, 0.1, 0.1, 0.2, 0.3]


def test_adaptive_tolerance_cap_direction_and_nan() -> None:
    schedule = BetaSchedule(kind="adaptive", initial=0.5, step=0.3, max=0.9, tolerance=1.0)
    # greater is better: a fall of more than 1.0 is worse; 0.5 + 0.3 = 0.8, then capped at 0.9.
    assert observe_all(schedule, [20.0, 19.5, 18.0, float("nan"), 16.0, 10.0], True) == [0.5, 0.5, 0.8, 0.8, 0.9, 0.9]
    assert schedule.beta(0, 0, AdaptiveFraction(fraction=0.8)) == pytest.approx(0.2)
    assert schedule.beta(0, 0) == 0.5  # before the run state exists: 1 - initial
    ten = observe_all(BetaSchedule(kind="adaptive"), [float(-i) for i in range(12)], True)
    assert ten[-1] == 1.0 and ten[10] == 1.0  # ten steps of 0.1 reach max exactly
    state = AdaptiveFraction(fraction=0.3, reference=2.5, raises=2)
    assert AdaptiveFraction.from_state(state.state_dict()) == state


def test_adaptive_options_are_refused_elsewhere_and_checked() -> None:
    with pytest.raises(ValidationError, match="kind: adaptive"):
        BetaSchedule(kind="constant", value=0.5, step=0.2)
    with pytest.raises(ValidationError, match="initial <= max"):
        BetaSchedule(kind="adaptive", initial=0.6, max=0.5)
    with pytest.raises(ValidationError):
        BetaSchedule(kind="adaptive", compare_with="best")  # type: ignore[arg-type]


def test_a_saved_config_with_every_key_at_its_default_is_accepted_and_a_changed_adaptive_key_is_refused() -> None:
    """A run's config.yaml writes every key of method.schedule, the adaptive ones at their defaults too; reading it
    back (kd eval, kd export) must accept them, while a changed adaptive key without kind: adaptive is refused."""
    import pytest

    from kd_plugins.text.schedules import BetaSchedule

    dumped = BetaSchedule(kind="exponential", base=200.0).model_dump()
    assert BetaSchedule.model_validate(dumped).base == 200.0
    with pytest.raises(ValueError, match="adaptive"):
        BetaSchedule.model_validate({**dumped, "step": 0.2})


def test_warmup_keeps_the_data_targets_then_follows_the_kind() -> None:
    constant = BetaSchedule(kind="constant", value=0.5, warmup=0.3)
    assert [constant.beta(step, 10) for step in range(10)] == [1.0] * 3 + [0.5] * 7
    exponential = BetaSchedule(kind="exponential", base=100.0, warmup=0.5)
    assert exponential.beta(4, 10) == 1.0
    assert exponential.beta(5, 10) == pytest.approx(100 ** -0.5)  # the formula at the same t, not restarted
    with pytest.raises(ValueError, match="total number of training steps"):
        constant.beta(0, 0)
    with pytest.raises(ValidationError, match="adaptive schedule sets the student fraction itself"):
        BetaSchedule(kind="adaptive", warmup=0.2)
    with pytest.raises(ValidationError):
        BetaSchedule(kind="constant", warmup=1.0)
