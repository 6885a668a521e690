"""Token-level losses shared by the text methods, all delegating the math to kdcore.

* :func:`nll_loss` calls ``kdcore.objectives.token_nll``.
* :func:`teacher_distribution_loss` asks teacher and student for what the chosen
  path needs and calls ``kdcore.objectives.divergence`` (dense logits) or
  ``kdcore.fused.fused_linear_divergence`` (final hidden states and output
  projections; the ``(B, T, V)`` logits are never materialised).

kdcore's modules are imported when first used, so this module imports without them.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdcore.interfaces import Batch
from kdcore.signals import Signal, SignalRequest, Signals
from kd_plugins.text.models import HFTextModel

DivergenceKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]

# "auto" takes the fused path from the same vocabulary size as kdcore's objectives (one threshold).
from kdcore.objectives.library import FUSED_AUTO_MIN_VOCAB  # noqa: E402

LOGITS = SignalRequest(frozenset({Signal.LOGITS}))
FINAL_HIDDEN = SignalRequest(frozenset({Signal.FINAL_HIDDEN}))
LOGITS_AND_FINAL_HIDDEN = SignalRequest(frozenset({Signal.LOGITS, Signal.FINAL_HIDDEN}))


class DivergenceOptions(BaseModel):
    """Which divergence compares the student's next-token distribution with the teacher's."""

    model_config = ConfigDict(extra="forbid")

    divergence: DivergenceKind = Field("forward_kl", description="kdcore.objectives divergence")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="JSD(β) mixing weight (divergence: jsd)")
    skew: float = Field(0.1, ge=0.0, le=1.0, description="skew of skew_forward_kl / skew_reverse_kl")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature applied to both models")
    fused: bool | Literal["auto"] = Field(
        "auto", description=f"use kdcore.fused (no (B,T,V) logits); auto: when available and vocab >= "
                            f"{FUSED_AUTO_MIN_VOCAB}")
    fused_chunk_size: int | None = Field(None, gt=0, description="positions per chunk on the fused path")


def use_fused(options: DivergenceOptions, student: HFTextModel) -> bool:
    """Whether ``options`` select the fused path for this student."""
    if options.fused == "auto":
        return student.vocab_size >= FUSED_AUTO_MIN_VOCAB
    return bool(options.fused)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood (labels == -100 ignored), from kdcore.objectives."""
    from kdcore.objectives import token_nll

    return token_nll(logits, labels)


def teacher_distribution_loss(options: DivergenceOptions, teacher: HFTextModel, student: HFTextModel, batch: Batch,
                              labels: torch.Tensor, *, need_student_logits: bool = False) -> tuple[torch.Tensor, Signals]:
    """Divergence between teacher and student next-token distributions on ``batch``'s prefixes.

    ``labels`` (aligned with the logits, -100 = ignore) only select the positions
    that count. Returns the loss and the student's signals (with ``logits`` when
    the dense path is used or ``need_student_logits`` is set, e.g. to add an NLL term).
    """
    if use_fused(options, student):
        from kdcore.fused import fused_linear_divergence

        teacher_signals = teacher.signals(batch, FINAL_HIDDEN)  # type: ignore[attr-defined]
        student_signals = student.forward_signals(batch, LOGITS_AND_FINAL_HIDDEN if need_student_logits
                                                  else FINAL_HIDDEN)
        loss = fused_linear_divergence(
            student_signals.final_hidden, student_signals.output_weight,
            teacher_signals.final_hidden, teacher_signals.output_weight, options.divergence,
            student_bias=student_signals.output_bias, teacher_bias=teacher_signals.output_bias, labels=labels,
            beta=options.beta, skew=options.skew, temperature=options.temperature, chunk_size=options.fused_chunk_size)
        return loss, student_signals

    from kdcore.objectives import divergence

    teacher_signals = teacher.signals(batch, LOGITS)  # type: ignore[attr-defined]
    student_signals = student.forward_signals(batch, LOGITS)
    loss = divergence(student_signals.logits, teacher_signals.logits, options.divergence, beta=options.beta,
                      skew=options.skew, temperature=options.temperature, labels=labels)
    return loss, student_signals


__all__ = ["DivergenceKind", "DivergenceOptions", "FUSED_AUTO_MIN_VOCAB", "nll_loss", "teacher_distribution_loss",
           "use_fused"]
