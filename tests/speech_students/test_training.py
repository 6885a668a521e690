"""A few steps of distillation from a tiny random WavLM teacher on random audio reduce the loss."""
from __future__ import annotations

import pytest
import torch

from kd_plugins.speech.distilhubert import DistilHubertMethod, DistilHubertStudentConfig, DistilHubertStudentFactory
from kd_plugins.speech.gendistiller import GenDistillerMethod, GenDistillerStudentConfig, GenDistillerStudentFactory
from kdcore.interfaces import BuildContext, Method, WeightedObjective
from kdcore.objectives.layers import DistilHubertObjective

NO_DROPOUT = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}
#: The methods' default objective: the papers' L1 - log sigmoid(cos) per target layer.
PAPER_LOSS = [WeightedObjective("kd", DistilHubertObjective(), 1.0)]


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
    method = DistilHubertMethod(DistilHubertMethod.Config(), None, teacher, student, PAPER_LOSS)
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
    config = GenDistillerMethod.Config(train_inputs="teacher", sampling_start=sampling, sampling_end=sampling,
                                       sampling_schedule="constant")
    method = GenDistillerMethod(config, None, teacher, student, PAPER_LOSS)
    before = [p.detach().clone() for p in student.parameters()]
    losses = _train(method, audio_batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()) if b.requires_grad and b.dim() > 1)
    parts = method.training_step(audio_batch, 0).parts
    assert set(parts) == {"kd", "kd/layer2", "kd/layer3", "kd/layer4", "sampling_prob"}
    assert parts["sampling_prob"] == sampling


@pytest.mark.usefixtures("hidden_state_loss_available")
def test_gendistiller_generated_inputs_train_the_deployed_generation(tiny_sizes: dict, audio_batch: dict,
                                                                     teacher_factory, tmp_path) -> None:
    """train_inputs 'generated': the loss is the one of generate() and reaches block 0 through later blocks."""
    from kd_plugins.speech.speech_signals import teacher_layers
    from kdcore.objectives import multi_layer_hidden_loss

    teacher = teacher_factory("wavlm", layers=4)
    student = _build(GenDistillerStudentFactory, GenDistillerStudentConfig(**tiny_sizes, **NO_DROPOUT), teacher,
                     tmp_path)
    config = GenDistillerMethod.Config(train_inputs="generated")
    method = GenDistillerMethod(config, None, teacher, student, PAPER_LOSS)
    method.on_train_start(4)
    output = method.training_step(audio_batch, 0)
    assert output.parts["sampling_prob"] == 1.0
    with torch.no_grad():
        front_end, mask = student.features(audio_batch)
        targets = teacher_layers(teacher.signals(audio_batch, student.teacher_request()), student.target_layers)
        expected, _ = multi_layer_hidden_loss(student.generate(front_end, mask), targets, "l1_logsigmoid_cos",
                                              mask=mask)
    assert torch.allclose(output.loss.detach(), expected, atol=1e-5)
    # Same values as replaying the generated layers as detached inputs, but other gradients: they flow back
    # through each block's generated input into the blocks before it.
    generated = student.generate(front_end, mask)
    replayed = student.teacher_forced(front_end, mask, [layer.detach() for layer in generated[:-1]])
    weight = student.output_projection.weight
    through, = torch.autograd.grad(generated[-1][mask].sum(), weight)
    detached, = torch.autograd.grad(replayed[-1][mask].sum(), weight)
    assert torch.allclose(generated[-1][mask], replayed[-1][mask], atol=1e-5)
    assert not torch.allclose(through, detached, atol=1e-4)
    losses = _train(method, audio_batch)
    assert losses[-1] < 0.9 * losses[0], losses


def test_generated_inputs_refuse_scheduled_sampling() -> None:
    with pytest.raises(ValueError, match="method.train_inputs=teacher"):
        GenDistillerMethod.Config(sampling_end=0.5)
    assert GenDistillerMethod.Config().train_inputs == "generated"
