"""Registered hidden-state objectives: student and teacher layers compared position by position.

They read ``student.hidden_states`` and ``teacher.hidden_states`` (tuples of ``(B, T, D)``) and use
``batch["attention_mask"]`` as the position mask when its shape is ``(B, T)``. Each compared layer's loss is logged
as a part ``layer<N>``: N is the teacher's layer number when the teacher side names its hidden states
(``extra[HIDDEN_LAYER_IDS]``, e.g. a method that hands over selected target layers), else the student's index.
The math lives in :mod:`kdcore.objectives.hidden`; formulas and config keys: docs/objectives.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, field_validator
from torch import Tensor

from kdcore.errors import KDUserError
from kdcore.interfaces import Batch, Objective, ObjectiveOutput
from kdcore.objectives.hidden import hidden_state_positions, masked_mean, multi_layer_hidden_loss
from kdcore.objectives.inputs import hidden_states_of
from kdcore.signals import Signal, SignalRequest, Signals

#: ``Signals.extra`` key: the layer number of each entry of ``hidden_states`` when a side holds a selection of layers.
HIDDEN_LAYER_IDS = "hidden_layer_ids"


class HiddenConfig(BaseModel):
    """Config of the hidden-state objectives."""

    model_config = ConfigDict(extra="forbid")

    teacher_layers: list[int] | None = Field(
        None, description="student hidden_states[i] is compared with teacher hidden_states[teacher_layers[i]]; "
                          "unset: pair them in order (same count required)")
    layer_weights: list[NonNegativeFloat] | None = Field(
        None, min_length=1, description="one weight per compared layer (the layer losses are summed); unset: 1 each")

    @field_validator("layer_weights")
    @classmethod
    def _some_layer_counts(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and not any(weights):
            raise ValueError(f"layer_weights {weights} are all 0: the loss would be 0 whatever the student does; "
                             f"give at least one layer a positive weight (or remove the objective)")
        return weights


class DistilHubertConfig(HiddenConfig):
    """Config of DistilHuBERT's loss."""

    cos_weight: float = Field(1.0, ge=0, description="lambda in L1 - lambda * log sigmoid(cos)")


class _HiddenObjective(Objective):
    """Shared adapter for the hidden-state kinds; ``name`` is the kind."""

    Config: ClassVar[type[BaseModel]] = HiddenConfig

    def student_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.HIDDEN_STATES}))

    def teacher_request(self) -> SignalRequest:
        # All layers (None): teacher_layers index into the full tuple, so a subset would shift the indices.
        return SignalRequest(frozenset({Signal.HIDDEN_STATES}))

    def _cos_weight(self) -> float:
        return 1.0

    def pairs(self, student_states: Sequence[Tensor], teacher_states: Sequence[Tensor]) -> list[tuple[int, int]]:
        """(student index, teacher index) pairs from ``teacher_layers``."""
        teacher_layers = self.config.teacher_layers
        if teacher_layers is None:
            if len(student_states) != len(teacher_states):
                raise KDUserError(
                    f"The objective {self.name!r} pairs student and teacher hidden states in order, but the student "
                    f"returned {len(student_states)} and the teacher {len(teacher_states)}. Set "
                    f"args.teacher_layers to a list of {len(student_states)} teacher layer indices (0..."
                    f"{len(teacher_states) - 1}), e.g. every k-th layer.")
            return [(i, i) for i in range(len(student_states))]
        if len(teacher_layers) != len(student_states):
            raise KDUserError(
                f"The objective {self.name!r} has args.teacher_layers = {teacher_layers} ({len(teacher_layers)} "
                f"entries), but the student returned {len(student_states)} hidden states: give one teacher layer "
                f"index per student hidden state.")
        for layer in teacher_layers:
            if not -len(teacher_states) <= layer < len(teacher_states):
                raise KDUserError(
                    f"The objective {self.name!r} has teacher layer {layer} in args.teacher_layers, but the teacher "
                    f"returned {len(teacher_states)} hidden states (valid indices 0...{len(teacher_states) - 1}).")
        return list(enumerate(teacher_layers))

    def layer_weights(self, count: int) -> list[float]:
        """One weight per compared layer: ``args.layer_weights``, or 1 each."""
        weights = self.config.layer_weights
        if weights is None:
            return [1.0] * count
        if len(weights) != count:
            raise KDUserError(
                f"The objective {self.name!r} has args.layer_weights = {weights} ({len(weights)} entries), but it "
                f"compares {count} layers: give one weight per compared layer.")
        return [float(weight) for weight in weights]

    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        student_states = hidden_states_of(student, "student", self.name)
        teacher_states = hidden_states_of(teacher, "teacher", self.name)
        attention_mask = batch.get("attention_mask")
        pairs = self.pairs(student_states, teacher_states)
        weights = self.layer_weights(len(pairs))
        layer_ids = teacher.extra.get(HIDDEN_LAYER_IDS)
        names = [f"layer{student_index if layer_ids is None else layer_ids[teacher_index]}"
                 for student_index, teacher_index in pairs]
        student_layers, teacher_layers = [], []
        for student_index, teacher_index in pairs:
            student_hidden = student_states[student_index]
            teacher_hidden = teacher_states[teacher_index].to(student_hidden.device)
            if student_hidden.shape != teacher_hidden.shape:
                raise KDUserError(
                    f"The objective {self.name!r} compares student hidden state {student_index} of shape "
                    f"{tuple(student_hidden.shape)} with teacher layer {teacher_index} of shape "
                    f"{tuple(teacher_hidden.shape)}; they must have the same shape. Pick matching layers in "
                    f"args.teacher_layers, or use a method that projects the student (e.g. prediction heads).")
            student_layers.append(student_hidden)
            teacher_layers.append(teacher_hidden)
        leading = tuple(student_layers[0].shape[:-1])
        mask = attention_mask if attention_mask is not None and tuple(attention_mask.shape) == leading else None
        if all(tuple(layer.shape[:-1]) == leading for layer in student_layers):
            # one autograd node for all layers (gradients computed in forward): see multi_layer_hidden_loss
            total, per_layer = multi_layer_hidden_loss(student_layers, teacher_layers, self.name, mask=mask,
                                                       cos_weight=self._cos_weight(), layer_weights=weights)
            return ObjectiveOutput(total, {name: float(value) for name, value in zip(names, per_layer.detach())})
        # layers with different position counts (e.g. different frame rates): one at a time
        total: Tensor | None = None
        parts = {}
        for name, weight, student_hidden, teacher_hidden in zip(names, weights, student_layers, teacher_layers):
            layer_mask = attention_mask if attention_mask is not None and \
                tuple(attention_mask.shape) == tuple(student_hidden.shape[:-1]) else None
            per_position = hidden_state_positions(student_hidden, teacher_hidden, self.name,
                                                  cos_weight=self._cos_weight())
            layer_loss = masked_mean(per_position, layer_mask)
            parts[name] = float(layer_loss.detach())
            total = weight * layer_loss if total is None else total + weight * layer_loss
        assert total is not None
        return ObjectiveOutput(total, parts)


class HiddenL1Objective(_HiddenObjective):
    name: ClassVar[str] = "l1"
    description: ClassVar[str] = "L1 between student and teacher hidden states"


class HiddenMSEObjective(_HiddenObjective):
    name: ClassVar[str] = "mse"
    description: ClassVar[str] = "MSE between student and teacher hidden states"


class HiddenCosineObjective(_HiddenObjective):
    name: ClassVar[str] = "cosine"
    description: ClassVar[str] = "1 - cosine similarity between student and teacher hidden states"


class DistilHubertObjective(_HiddenObjective):
    name: ClassVar[str] = "l1_logsigmoid_cos"
    description: ClassVar[str] = "DistilHuBERT's L1 - log sigmoid(cos) per predicted layer"
    Config: ClassVar[type[BaseModel]] = DistilHubertConfig

    def _cos_weight(self) -> float:
        return float(self.config.cos_weight)


__all__ = ["HIDDEN_LAYER_IDS", "DistilHubertConfig", "DistilHubertObjective", "HiddenConfig", "HiddenCosineObjective",
           "HiddenL1Objective", "HiddenMSEObjective"]
