"""Losses between student and teacher hidden states (feature distillation).

Kinds (per time position, then averaged over the positions selected by ``mask``):

* ``l1``: mean over features of ``|h_S - h_T|``;
* ``mse``: mean over features of ``(h_S - h_T)**2``;
* ``cosine``: ``1 - cos(h_S, h_T)``;
* ``l1_logsigmoid_cos``: DistilHuBERT's ``mean|h_S - h_T| - cos_weight * log sigmoid(cos(h_S, h_T))``.

Computed in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

HiddenKind = Literal["l1", "mse", "cosine", "l1_logsigmoid_cos"]
HIDDEN_KINDS: tuple[str, ...] = ("l1", "mse", "cosine", "l1_logsigmoid_cos")
_COS_EPS = 1e-8


def hidden_state_positions(student_hidden: Tensor, teacher_hidden: Tensor, kind: str, *,
                           cos_weight: float = 1.0) -> Tensor:
    """Per-position loss, shape ``hidden.shape[:-1]`` (float32)."""
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"unknown hidden-state loss {kind!r}; expected one of {', '.join(HIDDEN_KINDS)}")
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same shape")
    student = student_hidden.float()
    teacher = teacher_hidden.float()
    if kind == "l1":
        return (student - teacher).abs().mean(-1)
    if kind == "mse":
        return (student - teacher).square().mean(-1)
    cosine = F.cosine_similarity(student, teacher, dim=-1, eps=_COS_EPS)
    if kind == "cosine":
        return 1.0 - cosine
    return (student - teacher).abs().mean(-1) - cos_weight * F.logsigmoid(cosine)


def masked_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``per_position`` over the positions where ``mask`` is true/1 (0 when none is)."""
    if mask is None:
        return per_position.mean()
    if tuple(mask.shape) != tuple(per_position.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the hidden states' positions are "
                         f"{tuple(per_position.shape)}")
    weights = mask.to(device=per_position.device, dtype=per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def hidden_state_loss(student_hidden: Tensor, teacher_hidden: Tensor, kind: str, *, mask: Tensor | None = None,
                      cos_weight: float = 1.0) -> Tensor:
    """Hidden-state loss averaged over valid positions.

    Args:
        student_hidden, teacher_hidden: ``(..., D)`` tensors of the same shape, e.g. ``(B, T, D)``.
        kind: ``"l1"``, ``"mse"``, ``"cosine"`` or ``"l1_logsigmoid_cos"``.
        mask: ``hidden.shape[:-1]`` bool or 0/1; positions that are false/0 are ignored.
        cos_weight: weight of the ``-log sigmoid(cos)`` term of ``l1_logsigmoid_cos`` (DistilHuBERT's lambda).

    Returns:
        A float32 scalar.
    """
    return masked_mean(hidden_state_positions(student_hidden, teacher_hidden, kind, cos_weight=cos_weight), mask)
