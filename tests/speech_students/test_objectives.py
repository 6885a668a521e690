"""The speech methods decide where student and teacher layers meet; the configured objectives decide how."""
from __future__ import annotations

import pytest
import torch

from kd_plugins.speech.distilhubert import DistilHubertMethod, DistilHubertStudentConfig, DistilHubertStudentFactory
from kd_plugins.speech.gendistiller import GenDistillerMethod, GenDistillerStudentConfig, GenDistillerStudentFactory
from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext, WeightedObjective
from kdcore.objectives.layers import DistilHubertObjective, HiddenCosineObjective, HiddenMSEObjective
from kdcore.registry import Registry
from kdcore.resolve import resolve_run

METHODS = {"gendistiller": (GenDistillerMethod, GenDistillerStudentFactory, GenDistillerStudentConfig),
           "distilhubert": (DistilHubertMethod, DistilHubertStudentFactory, DistilHubertStudentConfig)}


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover(entry_points=False)


def _method(plugin: str, objectives: list[WeightedObjective], tiny_sizes: dict, teacher,  # noqa: ANN001, ANN202
            tmp_path):
    method_cls, factory, student_config = METHODS[plugin]
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0, teacher=teacher)
    student = factory().build(student_config(**tiny_sizes, dropout=0.0, attention_dropout=0.0,
                                             activation_dropout=0.0), context)
    return method_cls(method_cls.Config(), None, teacher, student, objectives)


@pytest.mark.parametrize("plugin", sorted(METHODS))
@pytest.mark.parametrize("preset", [None, "paper", "wavlm-base-plus"])
def test_the_papers_loss_is_the_default_objective(registry: Registry, plugin: str, preset: str | None) -> None:
    resolved = resolve_run(registry, task="superb", plugin=plugin, preset=preset)
    [objective] = resolved.objectives
    assert (objective.label, objective.cls, objective.weight) == ("kd", DistilHubertObjective, 1.0)
    assert objective.config.cos_weight == 1.0
    # s3prl averages DistilHuBERT's three head losses, the paper (and GenDistiller) sums them
    s3prl_mean = plugin == "distilhubert" and preset == "paper"
    assert objective.config.layer_weights == ([1 / 3] * 3 if s3prl_mean else None)


@pytest.mark.parametrize(("plugin", "name", "objective_cls"),
                         [("gendistiller", "cosine", HiddenCosineObjective),
                          ("distilhubert", "mse", HiddenMSEObjective)])
def test_another_objective_changes_what_is_trained(registry: Registry, plugin: str, name: str, objective_cls: type,
                                                   tiny_sizes: dict, audio_batch: dict, teacher_factory,
                                                   tmp_path) -> None:
    resolved = resolve_run(registry, task="superb", plugin=plugin, sets=[f"objectives.kd.name={name}"])
    assert [(item.label, item.cls) for item in resolved.objectives] == [("kd", objective_cls)]
    teacher = teacher_factory("wavlm", layers=4)
    default = _method(plugin, [WeightedObjective("kd", DistilHubertObjective(), 1.0)], tiny_sizes, teacher, tmp_path)
    other = _method(plugin, [WeightedObjective(name, objective_cls(), 1.0)], tiny_sizes, teacher, tmp_path)
    default_step, other_step = default.training_step(audio_batch, 0), other.training_step(audio_batch, 0)
    assert not torch.equal(default_step.loss, other_step.loss)
    # the label and each target layer's part, named after the teacher layer it is compared with
    assert {name, f"{name}/layer2", f"{name}/layer3", f"{name}/layer4"} <= set(other_step.parts)
    other_step.loss.backward()
    assert all(p.grad is not None for p in other.speech_student.front_end.parameters() if p.requires_grad)


@pytest.mark.parametrize("plugin", sorted(METHODS))
def test_a_logit_objective_is_refused_at_planning(registry: Registry, plugin: str) -> None:
    with pytest.raises(KDUserError) as error:
        resolve_run(registry, task="superb", plugin=plugin, sets=["objectives.kd.name=forward_kl"])
    message = str(error.value)
    assert f"method '{plugin}'" in message and "'kd' (forward_kl)" in message
    assert "asks the student for logits" in message and "offers the student's hidden_states" in message


def test_a_logit_objective_exits_2_under_dry_run(tmp_path, run_kd) -> None:  # noqa: ANN001
    result = run_kd("run", "--task", "superb", "--plugin", "gendistiller", "--set", "objectives.kd.name=forward_kl",
                    "--dry-run", cwd=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "forward_kl" in result.stderr and "hidden_states" in result.stderr


def test_layer_weights_and_teacher_layers_of_the_objective(tiny_sizes: dict, audio_batch: dict, teacher_factory,
                                                          tmp_path) -> None:
    teacher = teacher_factory("wavlm", layers=4)
    weighted = DistilHubertObjective(DistilHubertObjective.Config(layer_weights=[0.0, 2.0, 0.0]))
    step = _method("distilhubert", [WeightedObjective("kd", weighted, 1.0)], tiny_sizes, teacher,
                   tmp_path).training_step(audio_batch, 0)
    assert float(step.loss.detach()) == pytest.approx(2.0 * step.parts["kd/layer3"], rel=1e-6)
    # The method pairs each prediction with its target layer: a teacher_layers choice would be silently re-indexed.
    chosen = HiddenMSEObjective(HiddenMSEObjective.Config(teacher_layers=[2, 3, 4]))
    with pytest.raises(KDUserError, match="objectives.kd.args.teacher_layers"):
        _method("gendistiller", [WeightedObjective("kd", chosen, 1.0)], tiny_sizes, teacher, tmp_path)


def test_the_method_needs_its_own_student(tiny_sizes: dict, teacher_factory, tmp_path) -> None:
    teacher = teacher_factory("wavlm", layers=4)
    student = _method("distilhubert", [], tiny_sizes, teacher, tmp_path).speech_student
    with pytest.raises(KDUserError, match="needs student 'gendistiller-student'"):
        GenDistillerMethod(GenDistillerMethod.Config(), None, teacher, student,
                           [WeightedObjective("kd", DistilHubertObjective(), 1.0)])
