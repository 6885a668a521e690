"""A third-party kd method, registered through the ``kd.plugins`` entry point: ``noised-kd``.

Consistent teaching (Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and consistent"):
teacher and student see the *same* perturbed input, so the student learns to match the teacher's function around
the data rather than only on it. Here the perturbation is Gaussian noise on the batch's feature tensors. The method
only decides where the two meet; how they are compared is the configured objectives' job (a temperature-2 forward
KL by default, any other with ``--set objectives.kd.name=...``).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from kdcore.api import Batch, Comparison, KDUserError, Method, StrictModel, hookimpl


class NoisedKD(Method):
    """Teacher and student on the same noised copy of each batch."""

    name = "noised-kd"
    description = "KD on noised inputs: teacher and student see the same Gaussian-perturbed batch [example plugin]"

    class Config(StrictModel):  # the run config's `method` section
        std: float = Field(0.1, gt=0, description="standard deviation of the noise added to each feature")
        inputs: list[str] = Field(["inputs"], min_length=1, description="the batch's float tensors to perturb")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"objectives": {"kd": {"name": "forward_kl", "args": {"temperature": 2.0}}}}

    def compare(self, batch: Batch, step: int) -> Comparison:
        noised = dict(batch)
        for key in self.config.inputs:
            features = batch.get(key)
            if not (isinstance(features, torch.Tensor) and features.is_floating_point()):
                raise KDUserError(
                    f"method.inputs names '{key}', but task '{self.task.name}' has no float tensor of that name in "
                    f"its batches (it has {sorted(batch)}). Set method.inputs to the feature tensors to perturb.")
            noised[key] = features + self.config.std * torch.randn_like(features)
        teacher = self.teacher.signals(noised, self.teacher_request())
        student = self.student.forward_signals(noised, self.student_request())
        return Comparison(student, teacher, noised)


@hookimpl
def kd_register_methods() -> list[type[Method]]:
    return [NoisedKD]
