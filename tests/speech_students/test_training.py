"""A few steps of distillation from a tiny random WavLM teacher on random audio reduce the loss."""
from __future__ import annotations

import pytest
import torch

from kd_plugins.speech.distilhubert import DistilHubertMethod, DistilHubertStudentConfig, DistilHubertStudentFactory
from kd_plugins.speech.gendistiller import GenDistillerMethod, GenDistillerStudentConfig, GenDistillerStudentFactory
from kdcore.interfaces import BuildContext, Method

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def _train(method: Method, batch: dict, steps: int = 8) -> list[float]:
    optimiser = torch.optim.Adam(method.trainable_modules().parameters(), lr=2e-3)
    method.on_train_start(steps)
    method.student.train()
    losses = []
    for step in range(steps):
        output = method.training_step(batch, step)
        optimiser.zero_grad()
        output.loss.backward()
        optimiser.step()
        losses.append(float(output.loss.detach()))
    return losses


def _build(factory: type, config: object, teacher, tmp_path):  # noqa: ANN001, ANN202
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0, teacher=teacher)
    return factory().build(config, context)


@pytest.mark.usefixtures("hidden_state_loss_available")
def test_distilhubert_training_reduces_loss(tiny_sizes: dict, audio_batch: dict, teacher_factory, tmp_path) -> None:
    teacher = teacher_factory("wavlm", layers=4)
    student = _build(DistilHubertStudentFactory, DistilHubertStudentConfig(**tiny_sizes, **NO_DROPOUT), teacher,
                     tmp_path)
    method = DistilHubertMethod(DistilHubertMethod.Config(), None, teacher, student, [])
    losses = _train(method, audio_batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.usefixtures("hidden_state_loss_available")
@pytest.mark.parametrize("sampling", [0.0, 0.5])
def test_gendistiller_training_reduces_loss(tiny_sizes: dict, audio_batch: dict, teacher_factory, tmp_path,
                                            sampling: float) -> None:
    teacher = teacher_factory("wavlm", layers=4)
    student = _build(GenDistillerStudentFactory, GenDistillerStudentConfig(**tiny_sizes, **NO_DROPOUT), teacher,
                     tmp_path)
    config = GenDistillerMethod.Config(sampling_start=sampling, sampling_end=sampling, sampling_schedule="constant")
    method = GenDistillerMethod(config, None, teacher, student, [])
    before = [p.detach().clone() for p in student.parameters()]
    losses = _train(method, audio_batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()) if b.requires_grad and b.dim() > 1)
    parts = method.training_step(audio_batch, 0).parts
    assert set(parts) == {"layer2", "layer3", "layer4", "sampling_prob"} and parts["sampling_prob"] == sampling
