"""multi_layer_hidden_loss: one autograd node for several layers, equal to hidden_state_loss layer by layer."""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kdcore.objectives import HIDDEN_KINDS, hidden_state_loss, multi_layer_hidden_loss


def _layers(count: int, shape: tuple[int, ...], seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(dtype) for _ in range(count)]


def _reference(students, teachers, kind, mask, cos_weight, weights):
    per_layer = [hidden_state_loss(s, t, kind, mask=mask, cos_weight=cos_weight) for s, t in zip(students, teachers)]
    return sum(w * loss for w, loss in zip(weights, per_layer)), per_layer


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(HIDDEN_KINDS), layers=st.integers(1, 4), batch=st.integers(1, 3),
       frames=st.integers(1, 9), features=st.integers(1, 12), chunk_rows=st.integers(1, 8),
       use_mask=st.booleans(), cos_weight=st.floats(0.0, 2.0), seed=st.integers(0, 10_000))
@example(kind="cosine", layers=1, batch=1, frames=1, features=1, chunk_rows=1, use_mask=False, cos_weight=0.0, seed=0)
@example(kind="cosine", layers=1, batch=1, frames=1, features=1, chunk_rows=1, use_mask=False, cos_weight=0.0, seed=256)
def test_equals_the_per_layer_loss_values_and_gradients(kind, layers, batch, frames, features, chunk_rows, use_mask,
                                                        cos_weight, seed) -> None:
    students = [s.requires_grad_() for s in _layers(layers, (batch, frames, features), seed)]
    teachers = _layers(layers, (batch, frames, features), seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    mask = (torch.rand(batch, frames, generator=g) > 0.3) if use_mask else None
    weights = torch.rand(layers, generator=g).tolist()
    # edge cases of the closed-form gradients: a zero student vector (cosine clamp), equal entries (|0|)
    with torch.no_grad():
        students[0][0, 0] = 0.0
        students[-1][..., 0] = teachers[-1][..., 0]
    total, per_layer = multi_layer_hidden_loss(students, teachers, kind, mask=mask, cos_weight=cos_weight,
                                               layer_weights=weights, chunk_rows=chunk_rows)
    # per_layer is differentiable too: use it in the objective, as a method logging it might
    (total + per_layer[0]).backward()
    got = [s.grad.clone() for s in students]
    for s in students:
        s.grad = None
    expected_total, expected_layers = _reference(students, teachers, kind, mask, cos_weight, weights)
    (expected_total + expected_layers[0]).backward()
    torch.testing.assert_close(total.double(), expected_total.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_layer.double(), torch.stack(expected_layers).detach().double(), rtol=1e-5, atol=1e-6)
    for mine, student in zip(got, students):
        # 1e-5 of the gradient's scale, plus float32 rounding of the terms it is made of: both sides
        # compute in float32, and where the exact gradient is 0 (e.g. cosine of equal 1-d vectors)
        # each keeps a few ulps of the cosine-gradient terms t/(|s||t|), whose size is 1/|s|
        norms = student.detach().norm(dim=-1)
        term = max(1.0, float((1.0 / norms[norms > 1e-8]).max()) if bool((norms > 1e-8).any()) else 1.0)
        scale = float(student.grad.abs().max())
        torch.testing.assert_close(mine, student.grad, rtol=1e-5, atol=1e-5 * scale + 1e-6 * term)


def test_bf16_layers_get_bf16_gradients_within_bf16_precision() -> None:
    # Stated tolerance: float32 math on bf16 inputs, gradients rounded to bf16 (1e-2 of their scale)
    students = [s.requires_grad_() for s in _layers(3, (2, 5, 16), 0, torch.bfloat16)]
    teachers = _layers(3, (2, 5, 16), 1, torch.bfloat16)
    total, _ = multi_layer_hidden_loss(students, teachers, "l1_logsigmoid_cos")
    total.backward()
    reference_students = [s.detach().double().requires_grad_() for s in students]
    expected, _ = _reference(reference_students, [t.double() for t in teachers], "l1_logsigmoid_cos", None, 1.0,
                             [1.0] * 3)
    expected.backward()
    torch.testing.assert_close(total.double(), expected.detach().double(), rtol=1e-5, atol=1e-6)
    for student, reference in zip(students, reference_students):
        assert student.grad.dtype == torch.bfloat16
        scale = float(reference.grad.abs().max())
        torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-2, atol=1e-2 * scale)


def test_layers_may_differ_in_width_and_frozen_layers_get_no_gradient() -> None:
    students = [torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 3)]
    teachers = [torch.randn(2, 4, 6), torch.randn(2, 4, 3)]
    total, per_layer = multi_layer_hidden_loss(students, teachers, "mse", layer_weights=[1.0, 0.0])
    total.backward()
    assert students[0].grad is not None and students[1].grad is None
    torch.testing.assert_close(per_layer[1], hidden_state_loss(students[1], teachers[1], "mse"))


def test_bad_arguments_are_refused() -> None:
    layer = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="unknown"):
        multi_layer_hidden_loss([layer], [layer], "l2")
    with pytest.raises(ValueError, match="same positive number"):
        multi_layer_hidden_loss([layer], [], "l1")
    with pytest.raises(ValueError, match="layer_weights"):
        multi_layer_hidden_loss([layer], [layer], "l1", layer_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="same shape"):
        multi_layer_hidden_loss([layer], [torch.zeros(2, 3, 5)], "l1")
    with pytest.raises(ValueError, match="mask"):
        multi_layer_hidden_loss([layer], [layer], "l1", mask=torch.ones(3, 2))


@pytest.mark.parametrize("frames", [(3, 3), (3, 5)])  # one autograd node, and layers of different lengths
def test_objective_layer_weights_and_part_names(frames: tuple[int, int]) -> None:
    from pydantic import ValidationError

    from kdcore.errors import KDUserError
    from kdcore.objectives.layers import HIDDEN_LAYER_IDS, HiddenL1Objective
    from kdcore.signals import Signals

    students = tuple(torch.randn(2, length, 4) for length in frames)
    teachers = tuple(torch.randn(2, length, 4) for length in frames)
    objective = HiddenL1Objective(HiddenL1Objective.Config(layer_weights=[0.5, 3.0]))
    named_teacher = Signals(hidden_states=teachers, extra={HIDDEN_LAYER_IDS: (4, 8)})
    output = objective(Signals(hidden_states=students), named_teacher, {})
    per_layer = [hidden_state_loss(s, t, "l1") for s, t in zip(students, teachers)]
    torch.testing.assert_close(output.loss, 0.5 * per_layer[0] + 3.0 * per_layer[1])
    assert output.parts == pytest.approx({"layer4": float(per_layer[0]), "layer8": float(per_layer[1])})
    unnamed = HiddenL1Objective()(Signals(hidden_states=students), Signals(hidden_states=teachers), {})
    assert set(unnamed.parts) == {"layer0", "layer1"}
    with pytest.raises(KDUserError, match="layer_weights"):
        HiddenL1Objective(HiddenL1Objective.Config(layer_weights=[1.0]))(
            Signals(hidden_states=students), Signals(hidden_states=teachers), {})
    with pytest.raises(ValidationError, match="all 0"):
        HiddenL1Objective.Config(layer_weights=[0.0, 0.0])
    with pytest.raises(ValidationError):
        HiddenL1Objective.Config(layer_weights=[1.0, -1.0])
