"""Distillation across tokenizers by matching the likelihoods of aligned text pieces.

Teacher and student read the same text through different tokenizers. :mod:`kdcore.objectives.token_alignment`
cuts the text into *aligned groups*, pieces that both tokenizations cover exactly (teacher tokens i..j, student
tokens k..l). For each group both models assign a probability to the same event, "this piece of text comes next":
by the chain rule the log-probability of a run of tokens is the sum of their conditional log-probabilities,

    log p_T(group) = sum over the group's teacher positions t of log softmax(teacher_logits[t])[teacher_labels[t]]

and likewise ``log p_S(group)`` from the student's own logits and target tokens (differentiable). This is the
token merging of TRL's GOLD trainer (``_merge_probabilities_with_alignment_groups`` in
``trl/experimental/gold/gold_trainer.py`` multiplies the conditional probabilities of a group's actual tokens) and
the chunk likelihood of Approximate Likelihood Matching (ALM; Minixhofer, Vulić and Ponti, 2025, "Universal
Cross-Tokenizer Distillation via Approximate Likelihood Matching"; ``compute_alm_loss`` in
``tokenkit/training/losses.py``). What is compared, as in ALM, is the *likelihoods*: each group is a Bernoulli
event with probability ``p_T(group)`` for the teacher and ``p_S(group)`` for the student, and the loss is a
distance between the two Bernoullis, averaged over the groups (ALM's default chunk-count normalisation). GOLD
instead scales the first token's whole distribution by the later tokens' probabilities and compares sorted
vectors (ULD); that part is not implemented here (:mod:`kdcore.objectives.uld` is the plain ULD).

Distances (``distance``), on ``y = p^(1/temperature)`` (ALM's binarisation temperature, applied to the group
log-probabilities, then ALM's ``epsilon`` = 1e-6 subtracted from both so that ``1 - y`` never underflows to 0):

* ``binary_kl`` (default): KL(Bern(y_T) || Bern(y_S)) = y_T log(y_T/y_S) + (1-y_T) log((1-y_T)/(1-y_S)). ALM's
  default ``binary_ce`` is this plus the teacher's binary entropy, a constant: same gradient; here the loss is 0
  when the likelihoods agree.
* ``reverse_binary_kl``: KL(Bern(y_S) || Bern(y_T)) (ALM's ``reverse_binary_kl``).
* ``abs_log``: ``|log y_T - log y_S|`` (ALM's ``abs``, which applies no temperature; here it divides the value).
* ``abs_prob``: ``|y_T - y_S|`` (ALM's ``abs_exp``).

Not implemented from ALM: its "append_space" / "merge_by_space_prob" corrections for the tokenisation bias at chunk
ends (they need the probability of "a space follows" from a vocabulary-wide mask), the hidden-state ("latents")
loss, and chunk-size multiples (``distill_chunk_sizes``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from kdcore.objectives.token_alignment import AlignedGroup, align_offsets
from kdcore.signals import IGNORE_INDEX

Distance = Literal["binary_kl", "reverse_binary_kl", "abs_log", "abs_prob"]
DISTANCES: tuple[str, ...] = ("binary_kl", "reverse_binary_kl", "abs_log", "abs_prob")
#: ALM's epsilon: subtracted from the (tempered) group log-probabilities so that log(1 - y) stays finite at p = 1.
LIKELIHOOD_EPSILON = 1e-6
# Below this a log-probability is an underflowed 0: clamping keeps 0 * log 0 terms at 0 instead of NaN.
_LOG_FLOOR = -1e4


def _rows(values: Any) -> list[Any]:
    return values.tolist() if isinstance(values, Tensor) else [list(row) for row in values]


def batch_groups(teacher_offsets: Any, student_offsets: Any, teacher_labels: Tensor,
                 student_labels: Tensor) -> list[list[AlignedGroup]]:
    """Per batch row, the aligned groups whose tokens are all scored (label != -100) on both sides.

    ``*_offsets``: ``(B, T, 2)`` character offsets (a tensor or nested lists) of the target token at each logit
    position of that side, ``(0, 0)`` where there is none (special tokens, padding). A group with an unscored token
    (a prompt, a truncated or padded position) is dropped whole: its likelihood needs all of its tokens.
    """
    teacher_rows, student_rows = _rows(teacher_offsets), _rows(student_offsets)
    teacher_scored = (teacher_labels != IGNORE_INDEX).tolist()
    student_scored = (student_labels != IGNORE_INDEX).tolist()
    if not len(teacher_rows) == len(student_rows) == len(teacher_scored) == len(student_scored):
        raise ValueError(f"batch sizes differ: teacher offsets {len(teacher_rows)}, student offsets "
                         f"{len(student_rows)}, teacher labels {len(teacher_scored)}, student labels "
                         f"{len(student_scored)}")
    groups: list[list[AlignedGroup]] = []
    for t_offsets, s_offsets, t_scored, s_scored in zip(teacher_rows, student_rows, teacher_scored, student_scored):
        if len(t_offsets) != len(t_scored) or len(s_offsets) != len(s_scored):
            raise ValueError(f"offsets give {len(t_offsets)} teacher and {len(s_offsets)} student positions, labels "
                             f"{len(t_scored)} and {len(s_scored)}: one (start, end) per logit position")
        groups.append([group for group in align_offsets(t_offsets, s_offsets)
                       if all(t_scored[p] for p in group.teacher) and all(s_scored[p] for p in group.student)])
    return groups


def group_log_probs(logits: Tensor, labels: Tensor, positions: Tensor, group_of_position: Tensor,
                    groups: int) -> Tensor:
    """``(groups,)`` float32 sums of ``log softmax(logits)[label]`` over the flat ``positions`` of each group.

    ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)``; ``positions`` index the flattened ``B * T`` positions and
    ``group_of_position`` names the group each one adds to. Only the rows at ``positions`` are normalised.
    """
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float()
    targets = labels.reshape(-1).index_select(0, positions).long()
    token_log_probs = rows.gather(-1, targets[:, None]).squeeze(-1) - rows.logsumexp(-1)
    return token_log_probs.new_zeros(groups).index_add(0, group_of_position, token_log_probs)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of log 1/2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def likelihood_distance(teacher_log_p: Tensor, student_log_p: Tensor, distance: str = "binary_kl",
                        temperature: float = 1.0) -> Tensor:
    """Per-group distance (float64) between Bernoulli(p_T) and Bernoulli(p_S), given ``log p`` of each side."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; expected one of {', '.join(DISTANCES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_t = (teacher_log_p.double() / temperature - LIKELIHOOD_EPSILON).clamp(min=_LOG_FLOOR)
    log_s = (student_log_p.double() / temperature - LIKELIHOOD_EPSILON).clamp(min=_LOG_FLOOR)
    if distance == "abs_log":
        return (log_t - log_s).abs()
    if distance == "abs_prob":
        return (log_t.exp() - log_s.exp()).abs()
    if distance == "reverse_binary_kl":
        log_t, log_s = log_s, log_t
    return log_t.exp() * (log_t - log_s) - torch.expm1(log_t) * (_log1mexp(log_t) - _log1mexp(log_s))


def cross_tokenizer_loss(student_logits: Tensor, teacher_logits: Tensor, student_labels: Tensor,
                         teacher_labels: Tensor, groups: Sequence[Sequence[AlignedGroup]], *,
                         distance: str = "binary_kl", temperature: float = 1.0) -> Tensor:
    """Mean over ``groups`` of the likelihood distance between teacher and student (float32; 0 when there are none).

    ``student_logits`` ``(B, T_S, V_S)`` and ``teacher_logits`` ``(B, T_T, V_T)`` with their own target ids
    ``student_labels`` ``(B, T_S)`` and ``teacher_labels`` ``(B, T_T)``; ``groups`` per row, from
    :func:`batch_groups` (positions index each side's time axis). The teacher is a constant.
    """
    if student_logits.dim() != 3 or teacher_logits.dim() != 3 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"expected (batch, time, vocab) logits with one batch size, got student "
                         f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}")
    device = student_logits.device
    t_length, s_length = teacher_logits.shape[1], student_logits.shape[1]
    t_positions: list[int] = []
    s_positions: list[int] = []
    t_owner: list[int] = []
    s_owner: list[int] = []
    count = 0
    for row, row_groups in enumerate(groups):
        for group in row_groups:
            t_positions.extend(row * t_length + p for p in group.teacher)
            s_positions.extend(row * s_length + p for p in group.student)
            t_owner.extend([count] * len(group.teacher))
            s_owner.extend([count] * len(group.student))
            count += 1
    if count == 0:
        return student_logits.sum() * 0.0

    def indices(values: list[int], on: torch.device) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=on)

    with torch.no_grad():
        t_device = teacher_logits.device
        teacher_log_p = group_log_probs(teacher_logits.detach(), teacher_labels.to(t_device),
                                        indices(t_positions, t_device), indices(t_owner, t_device), count).to(device)
    student_log_p = group_log_probs(student_logits, student_labels.to(device), indices(s_positions, device),
                                    indices(s_owner, device), count)
    return likelihood_distance(teacher_log_p, student_log_p, distance, temperature).mean().float()


__all__ = ["DISTANCES", "Distance", "LIKELIHOOD_EPSILON", "batch_groups", "cross_tokenizer_loss", "group_log_probs",
           "likelihood_distance"]
