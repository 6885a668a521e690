"""A third-party kd plugin: one objective, registered through the ``kd.plugins`` entry point.

``logit_mse`` is the mean squared error between student and teacher logits
(Kim et al., 2021, "Comparing Kullback-Leibler Divergence and Mean Squared
Error Loss in Knowledge Distillation"): no temperature, no softmax.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from kdcore.hookspecs import hookimpl
from kdcore.interfaces import Batch, Objective, ObjectiveOutput
from kdcore.signals import Signal, SignalRequest, Signals, SparseLogits


class LogitMSEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reduction: str = Field("mean", pattern="^(mean|sum)$", description="mean or sum over the vocabulary")


class LogitMSEObjective(Objective):
    """MSE between student and teacher logits, averaged over unmasked positions."""

    name: ClassVar[str] = "logit_mse"
    description: ClassVar[str] = "MSE between student and teacher logits (Kim et al. 2021) [example plugin]"
    Config = LogitMSEConfig

    def student_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.LOGITS}))

    def teacher_request(self) -> SignalRequest:
        return SignalRequest(frozenset({Signal.LOGITS}))

    def __call__(self, student: Signals, teacher: Signals, batch: Batch) -> ObjectiveOutput:
        teacher_logits = teacher.logits
        if isinstance(teacher_logits, SparseLogits):
            raise ValueError("logit_mse needs dense teacher logits")
        squared = (student.logits.float() - teacher_logits.float()).pow(2)
        per_position = squared.mean(-1) if self.config.reduction == "mean" else squared.sum(-1)
        labels = batch.get("labels")
        if labels is not None and labels.shape == per_position.shape:
            mask = labels != -100
            loss = (per_position * mask).sum() / mask.sum().clamp_min(1)
        else:
            loss = per_position.mean()
        return ObjectiveOutput(loss, {})


@hookimpl
def kd_register_objectives() -> list[type[Objective]]:
    return [LogitMSEObjective]
