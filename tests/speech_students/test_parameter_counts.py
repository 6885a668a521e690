"""Parameter counts of the `paper` presets with the WavLM Base+ teacher config (computed from the modules)."""
from __future__ import annotations

import pytest
import torch
from transformers import WavLMConfig, WavLMModel

from kd_plugins.speech.distilhubert import DistilHubertMethod, DistilHubertStudent, DistilHubertStudentFactory
from kd_plugins.speech.gendistiller import GenDistillerMethod, GenDistillerStudent, GenDistillerStudentFactory
from kd_plugins.speech.teachers import WAVLM_BASE_PLUS_CONFIG


@pytest.fixture(scope="module")
def teacher_parameters() -> int:
    preset_teacher = DistilHubertMethod.presets["paper"]["teacher"]
    assert preset_teacher["args"]["source"] is None  # built from the config: nothing downloaded
    with torch.device("meta"):  # only the count is needed: no memory, no initialisation
        model = WavLMModel(WavLMConfig(**preset_teacher["args"]["config"]))
    return sum(p.numel() for p in model.parameters())


def _paper_student(method: type, factory: type, student_cls: type) -> torch.nn.Module:
    preset = method.presets["paper"]
    assert preset["student"]["name"] == factory.name
    config = factory.Config.model_validate(preset["student"]["args"])
    method.Config.model_validate(preset.get("method", {}))  # the preset's method section is valid too
    return student_cls(config, teacher_dim=WAVLM_BASE_PLUS_CONFIG["hidden_size"])


def test_teacher_is_wavlm_base_plus(teacher_parameters: int) -> None:
    assert round(teacher_parameters / 1e6, 1) == 94.4  # transformers' WavLMModel (paper: 94.70M with extras)


def test_distilhubert_paper_preset_is_s3prls_23_491_200_without_heads() -> None:
    student = _paper_student(DistilHubertMethod, DistilHubertStudentFactory, DistilHubertStudent)
    assert student.parameter_count_excluding() == 23_491_200  # s3prl's DistillerModel (test_s3prl_parity.py)
    # s3prl's heads: Linear(768, 768 * 3) and SplitLinear(768, 3, 768)
    assert student.num_parameters() - student.parameter_count_excluding() == 768 * 2304 + 2304 + 3 * (768 * 768 + 768)


def test_gendistiller_paper_preset_is_a_third_smaller_and_a_fifth_of_the_teacher(teacher_parameters: int) -> None:
    baseline = _paper_student(DistilHubertMethod, DistilHubertStudentFactory, DistilHubertStudent)
    student = _paper_student(GenDistillerMethod, GenDistillerStudentFactory, GenDistillerStudent)
    count = student.parameter_count_excluding()
    assert count == student.num_parameters()  # nothing is training-only: all of it generates at inference
    assert count <= 16.4e6
    assert count <= 0.7 * baseline.parameter_count_excluding()  # >= 30% fewer than DistilHuBERT
    assert count <= 0.2 * teacher_parameters  # >= 80% fewer than the teacher
