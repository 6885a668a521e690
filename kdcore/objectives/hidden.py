"""Losses between student and teacher hidden states (feature distillation).

Kinds (per time position, then averaged over the positions selected by ``mask``):

* ``l1``: mean over features of ``|h_S - h_T|``;
* ``mse``: mean over features of ``(h_S - h_T)**2``;
* ``cosine``: ``1 - cos(h_S, h_T)``;
* ``l1_logsigmoid_cos``: DistilHuBERT's ``mean|h_S - h_T| - cos_weight * log sigmoid(cos(h_S, h_T))``.

Computed in float32 whatever the input dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
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


# --------------------------------------------------------------------------- several layers at once
def _position_loss_and_gradient(student: Tensor, teacher: Tensor, kind: str,
                                cos_weight: float) -> tuple[Tensor, Tensor]:
    """Per-row loss ``(n,)`` and its closed-form gradient ``(n, D)`` with respect to ``student`` (float32 rows).

    Same definitions as :func:`hidden_state_positions` (cosine as ``F.cosine_similarity``:
    ``s.t / (max(|s|, eps) max(|t|, eps))``; the sign of a zero difference counts as 0, as in autograd).
    """
    features = student.shape[-1]
    difference = student - teacher
    if kind == "mse":
        return difference.square().mean(-1), difference.mul_(2.0 / features)
    if kind == "l1":
        return difference.abs().mean(-1), difference.sign_().div_(features)
    student_norm = torch.linalg.vector_norm(student, dim=-1)
    denominator = student_norm.clamp_min(_COS_EPS) * torch.linalg.vector_norm(teacher, dim=-1).clamp_min(_COS_EPS)
    cosine = (student * teacher).sum(-1) / denominator
    # d cos / d s = t / den - cos * s / |s|^2 where |s| > eps; t / den where the clamp holds |s| at eps
    student_term = torch.where(student_norm > _COS_EPS, cosine / student_norm.square().clamp_min(_COS_EPS ** 2), 0.0)
    d_cosine = teacher / denominator.unsqueeze(-1) - student_term.unsqueeze(-1) * student
    if kind == "cosine":
        return 1.0 - cosine, d_cosine.neg_()
    if kind != "l1_logsigmoid_cos":
        raise ValueError(f"unknown hidden-state loss {kind!r}; expected one of {', '.join(HIDDEN_KINDS)}")
    loss = difference.abs().mean(-1) - cos_weight * F.logsigmoid(cosine)
    # d/dc of -w log sigmoid(c) = -w (1 - sigmoid(c)) = -w sigmoid(-c)
    gradient = difference.sign_().div_(features).sub_(d_cosine.mul_((cos_weight * torch.sigmoid(-cosine)).unsqueeze(-1)))
    return loss, gradient


class _MultiLayerHiddenLoss(torch.autograd.Function):
    """Per-layer masked-mean hidden losses with the student gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, position_weights: Tensor, kind: str, cos_weight: float, chunk_rows: int,  # type: ignore[override]
                teachers: tuple[Tensor, ...], *students: Tensor) -> Tensor:
        per_layer = torch.zeros(len(students), dtype=torch.float64, device=position_weights.device)
        gradients: list[Tensor | None] = []
        for layer, (student, teacher) in enumerate(zip(students, teachers)):
            student_flat = student.reshape(-1, student.shape[-1])
            teacher_flat = teacher.reshape(-1, teacher.shape[-1])
            gradient = torch.empty_like(student_flat) if ctx.needs_input_grad[5 + layer] else None
            for start in range(0, student_flat.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                weights = position_weights[rows]
                loss, chunk_gradient = _position_loss_and_gradient(
                    student_flat[rows].float(), teacher_flat[rows].float(), kind, cos_weight)
                per_layer[layer] += (loss * weights).sum(dtype=torch.float64)
                if gradient is not None:
                    gradient[rows] = chunk_gradient.mul_(weights.unsqueeze(-1))
            gradients.append(None if gradient is None else gradient.view(student.shape))
        # a plain attribute, handed over (scaled in place) by backward: no second copy of the gradients
        ctx.gradients = gradients
        return per_layer.to(torch.float32)

    @staticmethod
    def backward(ctx, grad_per_layer: Tensor):  # type: ignore[override]
        if ctx.gradients is None:
            raise RuntimeError("multi_layer_hidden_loss hands its precomputed gradients over in the first backward; "
                               "a second backward through the same graph is not supported")
        gradients, ctx.gradients = ctx.gradients, None
        outputs = [None if gradient is None else gradient.mul_(grad_per_layer[layer].to(gradient.dtype))
                   for layer, gradient in enumerate(gradients)]
        return (None, None, None, None, None, *outputs)


def multi_layer_hidden_loss(student_layers: Sequence[Tensor], teacher_layers: Sequence[Tensor], kind: str, *,
                            mask: Tensor | None = None, cos_weight: float = 1.0,
                            layer_weights: Sequence[float] | None = None,
                            chunk_rows: int = 4096) -> tuple[Tensor, Tensor]:
    """``sum_l layer_weights[l] * hidden_state_loss(student_layers[l], teacher_layers[l], kind, mask=mask)``.

    One autograd node for all layers instead of one small graph per layer: the per-position loss
    and its gradient with respect to each student layer are computed in the forward pass, in
    float32, ``chunk_rows`` positions at a time, so autograd keeps exactly one gradient tensor per
    layer (the size of the student layer) instead of the differences, absolute values and
    cosine intermediates a per-layer autograd graph saves. The values equal
    :func:`hidden_state_loss` layer by layer (tests/objectives/test_objectives_hidden_multi.py).

    Args:
        student_layers: ``L`` tensors ``(..., D)`` (e.g. DistilHuBERT's prediction-head outputs).
        teacher_layers: ``L`` tensors of the same shapes (no gradient flows to them).
        kind: ``"l1"``, ``"mse"``, ``"cosine"`` or ``"l1_logsigmoid_cos"``.
        mask: ``layer.shape[:-1]`` bool or 0/1 position mask shared by all layers; None: all count.
        cos_weight: lambda of ``l1_logsigmoid_cos``.
        layer_weights: one non-negative weight per layer (default 1 each).
        chunk_rows: positions per chunk of the float32 temporaries.

    Returns:
        ``(total, per_layer)``: the weighted sum (float32 scalar, differentiable) and the ``(L,)``
        unweighted per-layer losses (float32, differentiable as well).
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"unknown hidden-state loss {kind!r}; expected one of {', '.join(HIDDEN_KINDS)}")
    if len(student_layers) == 0 or len(student_layers) != len(teacher_layers):
        raise ValueError(f"need the same positive number of student and teacher layers, got {len(student_layers)} "
                         f"and {len(teacher_layers)}")
    weights = [1.0] * len(student_layers) if layer_weights is None else [float(w) for w in layer_weights]
    if len(weights) != len(student_layers) or any(w < 0 for w in weights):
        raise ValueError(f"layer_weights must be {len(student_layers)} non-negative numbers, got {layer_weights}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    leading = student_layers[0].shape[:-1]
    for student, teacher in zip(student_layers, teacher_layers):
        if student.shape != teacher.shape or student.shape[:-1] != leading:
            raise ValueError(f"student layer {tuple(student.shape)} and teacher layer {tuple(teacher.shape)} must have "
                             f"the same shape, with leading (position) shape {tuple(leading)} for every layer")
    device = student_layers[0].device
    positions = int(torch.Size(leading).numel())
    if mask is None:
        position_weights = torch.full((positions,), 1.0 / max(positions, 1), device=device)
    else:
        if tuple(mask.shape) != tuple(leading):
            raise ValueError(f"mask has shape {tuple(mask.shape)} but the hidden states' positions are {tuple(leading)}")
        counted = mask.reshape(-1).to(device=device, dtype=torch.float32)
        position_weights = counted / counted.sum().clamp_min(1.0)
    teachers = tuple(teacher.detach() for teacher in teacher_layers)
    per_layer = _MultiLayerHiddenLoss.apply(position_weights, kind, cos_weight, chunk_rows, teachers, *student_layers)
    total = (per_layer * torch.tensor(weights, dtype=torch.float32, device=per_layer.device)).sum()
    return total, per_layer
