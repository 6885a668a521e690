"""Universal Logit Distillation (Boizard et al., 2024): distillation across tokenizers.

When teacher and student have different vocabularies, their probability vectors cannot be
compared token by token. ULD compares them as *sorted* vectors: both distributions are
sorted in decreasing order, the shorter one is padded with zeros to the larger vocabulary,
and the loss is the L1 distance (a closed form of the Wasserstein-1 distance between the
two sets of probabilities under a uniform cost).

Sequences are paired by *position*, as ULD does: the i-th counted student position is paired
with the i-th counted teacher position, whatever text each covers, and the longer of the two
lists is truncated. Where the two tokenizers cut the text differently, these pairs predict
different pieces of text, so this is the fallback for when no character offsets are at hand;
:mod:`kdcore.objectives.cross_tokenizer` (objective ``cross_tokenizer``) aligns the text.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcore.objectives.divergence import IGNORE_INDEX
from kdcore.signals import SparseLogits


def _positions(labels: Tensor | None, batch: int, length: int, device: torch.device) -> list[Tensor]:
    """Per batch row, the sequence positions that count (labels != -100; all when labels is None)."""
    if labels is None:
        everything = torch.arange(length, device=device)
        return [everything] * batch
    if tuple(labels.shape) != (batch, length):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(batch, length)}")
    keep = labels.to(device) != IGNORE_INDEX
    return [row.nonzero().squeeze(-1) for row in keep]


def _sorted_probabilities(logits: Tensor, temperature: float) -> Tensor:
    return F.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values


def uld_loss(student_logits: Tensor, teacher_logits: Tensor | SparseLogits, *, temperature: float = 1.0,
             student_labels: Tensor | None = None, teacher_labels: Tensor | None = None) -> Tensor:
    """ULD loss between ``(B, T_S, V_S)`` student and ``(B, T_T, V_T)`` teacher logits.

    ``teacher_logits`` may be :class:`SparseLogits` (top-k): the teacher's sorted vector is then
    its renormalised top-k probabilities followed by zeros. Returns the mean over aligned
    positions of ``sum |sorted p_S - sorted p_T|`` (float32; 0 when nothing is aligned).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    sparse = isinstance(teacher_logits, SparseLogits)
    teacher_values = teacher_logits.values if isinstance(teacher_logits, SparseLogits) else teacher_logits
    if student_logits.dim() != 3 or teacher_values.dim() != 3 or student_logits.shape[0] != teacher_values.shape[0]:
        raise ValueError(f"ULD expects (batch, time, vocab) logits with the same batch size, got student "
                         f"{tuple(student_logits.shape)} and teacher {tuple(teacher_values.shape)}")
    device = student_logits.device
    batch = student_logits.shape[0]
    student_positions = _positions(student_labels, batch, student_logits.shape[1], device)
    teacher_positions = _positions(teacher_labels, batch, teacher_values.shape[1], device)
    student_rows, teacher_rows = [], []
    for row, (s_pos, t_pos) in enumerate(zip(student_positions, teacher_positions)):
        count = min(s_pos.numel(), t_pos.numel())
        student_rows.append(row * student_logits.shape[1] + s_pos[:count])
        teacher_rows.append(row * teacher_values.shape[1] + t_pos[:count].to(device))
    student_index = torch.cat(student_rows)
    if student_index.numel() == 0:
        return student_logits.sum() * 0.0
    teacher_index = torch.cat(teacher_rows).to(teacher_values.device)
    student_sorted = _sorted_probabilities(
        student_logits.reshape(-1, student_logits.shape[-1]).index_select(0, student_index), temperature)
    # Top-k values sorted and renormalised are exactly the nonzero head of the dense sorted vector.
    teacher_sorted = _sorted_probabilities(
        teacher_values.reshape(-1, teacher_values.shape[-1]).index_select(0, teacher_index), temperature
    ).to(device)
    if not sparse and teacher_sorted.shape[-1] == student_sorted.shape[-1]:
        difference = student_sorted - teacher_sorted
    else:
        width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
        difference = (F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
                      - F.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1])))
    return difference.abs().sum(-1).mean()
