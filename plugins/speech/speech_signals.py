"""The speech signal layout and where student and teacher frames meet.

Speech models answer with ``Signals(hidden_states=(..., (B, frames, D)), extra={"frame_mask": (B, frames) bool})``
(:func:`frame_signals`). The layer-distilling methods pick the target layers out of a teacher's answer
(:func:`teacher_layers`) and compare student and teacher on their common frames (:func:`align_frames`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kdcore.errors import KDUserError
from kdcore.signals import Signals


def frame_signals(hidden_states: Sequence[torch.Tensor], frame_mask: torch.Tensor, **extra: Any) -> Signals:
    """``Signals`` with hidden states and the frame mask, as speech teachers return them."""
    return Signals(hidden_states=tuple(hidden_states), extra={"frame_mask": frame_mask, **extra})


def teacher_layers(signals: Signals, layers: Sequence[int]) -> list[torch.Tensor]:
    """The teacher hidden states for ``layers`` from a teacher answer.

    Teachers return either every layer (HF ``output_hidden_states`` layout,
    index = layer number) or only the requested ones, in order.
    """
    hidden = signals.hidden_states
    if hidden is None:
        raise KDUserError("The teacher returned no hidden states; GenDistiller/DistilHuBERT need a teacher "
                          "that exposes its hidden layers (e.g. 'wavlm', 'hubert', 'whisper-encoder').")
    if len(hidden) > max(layers):
        return [hidden[layer] for layer in layers]
    if len(hidden) == len(layers):
        return list(hidden)
    raise KDUserError(f"The student's target_layers {list(layers)} ask for teacher layers the teacher does not "
                      f"have (it returned {len(hidden)} hidden states, layer 0 = pre-transformer features). "
                      f"Choose student.args.target_layers between 0 and {len(hidden) - 1}.")


def align_frames(student_mask: torch.Tensor, teacher_mask: torch.Tensor | None, teacher_frames: int,
                 max_mismatch: int) -> tuple[int, torch.Tensor]:
    """Common frame count and mask of student and teacher outputs.

    CNN students and WavLM/HuBERT teachers with the same CNN produce equal
    frames; other teachers (Whisper: 20 ms frames from a mel front end) may
    differ by a frame or two at the end. Both are cropped to the shorter
    length; a larger per-utterance difference means the frame rates differ
    and is a configuration error.
    """
    student_valid = student_mask.sum(1)
    if teacher_mask is None:
        teacher_mask = torch.ones(student_mask.shape[0], teacher_frames, dtype=torch.bool, device=student_mask.device)
    teacher_mask = teacher_mask.to(student_mask.device).bool()
    difference = (student_valid - teacher_mask.sum(1)).abs().max()
    if int(difference) > max_mismatch:
        raise KDUserError(
            f"Student and teacher frame counts differ by {int(difference)} frames for one utterance (more than "
            f"method.max_frame_mismatch={max_mismatch}): their frame rates differ. Give the student a CNN "
            f"(student.args.conv_layers) with the teacher's hop (320 samples = 20 ms for WavLM/HuBERT/Whisper).")
    frames = min(student_mask.shape[1], teacher_mask.shape[1])
    return frames, student_mask[:, :frames] & teacher_mask[:, :frames]


__all__ = ["align_frames", "frame_signals", "teacher_layers"]
