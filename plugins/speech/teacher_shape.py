"""What a speech student reads off its teacher: the teacher's width and depth, and the layers it predicts.

Sizes come from the teacher's own ``hidden_size`` / ``num_hidden_layers`` where it states them (a stored teacher,
which has no model, reads them from its store), else from the transformers config inside the teacher, else from
running the teacher once on a second of silence.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from kdcore.errors import KDUserError
from kdcore.interfaces import Teacher
from kdcore.signals import Signal, request
from kd_plugins.speech.waveforms import SAMPLE_RATE

if TYPE_CHECKING:
    from kd_plugins.speech.student_base import SpeechStudentConfig


def find_hf_speech_model(module: nn.Module) -> nn.Module | None:
    """The transformers WavLM/HuBERT/wav2vec 2.0 model inside a teacher wrapper, or None."""
    from transformers import HubertModel, Wav2Vec2Model, WavLMModel

    for candidate in module.modules():
        if isinstance(candidate, (WavLMModel, HubertModel, Wav2Vec2Model)):
            return candidate
    return None


def _teacher_config_value(teacher: Teacher, keys: Sequence[str]) -> int | None:
    """The first integer among ``keys`` in any transformers config inside the teacher."""
    for candidate in teacher.modules():
        config = getattr(candidate, "config", None)
        for key in keys:
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
    return None


def _probe_hidden_states(teacher: Teacher) -> tuple[torch.Tensor, ...]:
    """The teacher's hidden states on one second of silence (for teachers without a transformers config)."""
    device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    batch = {"waveform": torch.zeros(1, SAMPLE_RATE, device=device),
             "waveform_lengths": torch.tensor([SAMPLE_RATE], device=device)}
    return tuple(teacher.signals(batch, request(Signal.HIDDEN_STATES)).hidden_states or ())


def _stated(teacher: Teacher, attribute: str) -> int | None:
    value = getattr(teacher, attribute, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def teacher_hidden_size(teacher: Teacher) -> int:
    """Width of the teacher's hidden states: as the teacher states it, else from its transformers config, else by
    running it once on silence."""
    width = _stated(teacher, "hidden_size") or _teacher_config_value(teacher, ("hidden_size", "d_model"))
    if width is not None:
        return width
    hidden = _probe_hidden_states(teacher)
    if not hidden:
        raise KDUserError(f"The teacher {type(teacher).__name__} returned no hidden states; a speech student "
                          f"distils hidden layers, so pick a teacher that exposes them (e.g. 'wavlm').")
    return int(hidden[-1].shape[-1])


def teacher_num_layers(teacher: Teacher) -> int:
    """Transformer layers of the teacher: as the teacher states them, else from its transformers config, else by
    running it once on silence."""
    layers = _stated(teacher, "num_hidden_layers")
    if layers is None:
        layers = _teacher_config_value(teacher, ("num_hidden_layers", "encoder_layers"))
    return layers if layers is not None else len(_probe_hidden_states(teacher)) - 1


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """``count`` distinct layers in 1..num_layers ending at the last: round(num_layers * k / count), k = 1..count."""
    count = min(count, num_layers)
    return sorted({max(1, round(num_layers * k / count)) for k in range(1, count + 1)})


def resolve_target_layers(config: SpeechStudentConfig, teacher: Teacher | None) -> list[int]:
    """The teacher layers a student predicts: the configured ones (checked against the teacher's depth when
    it is known) or, for ``target_layers: null``, evenly spaced ones (layers 4, 8, 12 of 12)."""
    depth = teacher_num_layers(teacher) if teacher is not None else None
    if config.target_layers is None:
        if depth is None:
            raise KDUserError("student.args.target_layers is null (automatic) but no teacher is known to read its "
                              "depth from; list the teacher layers to predict, e.g. [4, 8, 12].")
        return evenly_spaced_layers(depth, config.num_targets)
    if depth is not None and max(config.target_layers) > depth:
        raise KDUserError(
            f"student.args.target_layers {config.target_layers} asks for layer {max(config.target_layers)}, "
            f"but the teacher has {depth} transformer layers (valid: 0..{depth}, 0 = pre-transformer); "
            f"or set target_layers: null to pick {config.num_targets} evenly spaced ones.")
    return list(config.target_layers)


def resolve_teacher_dim(config: SpeechStudentConfig, teacher: Teacher | None) -> int:
    """The teacher width a student must predict, from the config or the teacher."""
    if config.teacher_hidden_size is not None:
        if teacher is not None and (actual := teacher_hidden_size(teacher)) != config.teacher_hidden_size:
            raise KDUserError(
                f"student.args.teacher_hidden_size is {config.teacher_hidden_size}, but the teacher's hidden states "
                f"are {actual} wide: the student's prediction heads would not match the teacher. Set "
                f"student.args.teacher_hidden_size={actual} or leave it unset to take it from the teacher.")
        return config.teacher_hidden_size
    if teacher is None:
        raise KDUserError("Building a speech student needs the teacher's hidden size: no teacher was given, so "
                          "set student.args.teacher_hidden_size (e.g. 768 for WavLM/HuBERT Base).")
    return teacher_hidden_size(teacher)


__all__ = ["evenly_spaced_layers", "find_hf_speech_model", "resolve_target_layers", "resolve_teacher_dim",
           "teacher_hidden_size", "teacher_num_layers"]
