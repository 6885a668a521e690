"""A third-party kd objective, registered through the ``kd.plugins`` entry point: ``logit_mse``.

The mean squared error between student and teacher logits (Kim et al. 2021, "Comparing Kullback-Leibler
Divergence and Mean Squared Error Loss in Knowledge Distillation"): no temperature, no softmax. It reads logits
only, so it plugs into every method that hands over logits (vanilla, imitation, word-kd, ...).
"""
from __future__ import annotations

from typing import Literal

from kdcore.api import (
    IGNORE_INDEX, Batch, Objective, ObjectiveOutput, Signal, SignalRequest, Signals, SparseLogits, StrictModel,
    counted_positions, hookimpl, labels_of, logits_of, request,
)


class LogitMSE(Objective):
    """MSE between student and teacher logits, averaged over the scored positions."""

    name = "logit_mse"
    description = "MSE between student and teacher logits (Kim et al. 2021) [example plugin]"

    class Config(StrictModel):  # the objective's `args`
        reduction: Literal["mean", "sum"] = "mean"  # over the vocabulary

    def student_request(self) -> SignalRequest:
        return request(Signal.LOGITS)

    def teacher_request(self) -> SignalRequest:
        return request(Signal.LOGITS)

    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        student_logits = logits_of(student, "student", self.name).float()
        teacher_logits = logits_of(teacher, "teacher", self.name)
        if isinstance(teacher_logits, SparseLogits):  # cached top-k teacher logits: compare on those ids
            student_logits = student_logits.gather(-1, teacher_logits.indices.long())
            teacher_logits = teacher_logits.values
        squared = (student_logits - teacher_logits.float()).pow(2)
        per_position = squared.mean(-1) if self.config.reduction == "mean" else squared.sum(-1)
        labels = labels_of(batch, student_logits.shape, self.name)
        if labels is not None:
            per_position = per_position * (labels != IGNORE_INDEX)
        loss = per_position.sum() / max(counted_positions(labels, per_position.numel()), 1.0)
        return ObjectiveOutput(loss)


@hookimpl
def kd_register_objectives() -> list[type[Objective]]:
    return [LogitMSE]
