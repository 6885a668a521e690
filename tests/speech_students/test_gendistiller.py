"""GenDistiller student: teacher forcing vs generation, signals, scheduled sampling, errors."""
from __future__ import annotations

import pytest
import torch

from kd_plugins.speech.gendistiller import (
    GenDistillerConfig, GenDistillerMethod, GenDistillerStudent, GenDistillerStudentConfig,
    GenDistillerStudentFactory,
)
from kdcore.interfaces import BuildContext
from kdcore.signals import SignalRequest


def _student(tiny_sizes: dict, teacher_dim: int = 32, **overrides: object) -> GenDistillerStudent:
    torch.manual_seed(0)
    config = GenDistillerStudentConfig(**{**tiny_sizes, "num_layers": 2, "target_layers": [2, 3, 4], **overrides})
    return GenDistillerStudent(config, teacher_dim).eval()


@pytest.mark.parametrize("teacher_dim", [32, 24])
@pytest.mark.parametrize("mode", ["full", "same_time"])
def test_generation_equals_teacher_forcing_fed_its_own_outputs(tiny_sizes: dict, audio_batch: dict,
                                                               teacher_dim: int, mode: str) -> None:
    student = _student(tiny_sizes, teacher_dim, current_block_attention=mode)
    with torch.no_grad():
        front_end, mask = student.features(audio_batch)
        generated = student.generate(front_end, mask)
        replayed = student.teacher_forced(front_end, mask, generated[:-1])
        teacher_inputs = [torch.randn_like(generated[0]) for _ in range(2)]
        forced = student.teacher_forced(front_end, mask, teacher_inputs)
    assert len(generated) == 3 and generated[0].shape == (2, 149, teacher_dim)
    for own, again in zip(generated, replayed):
        assert torch.allclose(own[mask], again[mask], atol=1e-5)
    # Only the inputs differ: block 0 (no previous layer) agrees, later blocks do not.
    assert torch.allclose(forced[0][mask], generated[0][mask], atol=1e-5)
    assert not torch.allclose(forced[1][mask], generated[1][mask], atol=1e-3)


def test_mixed_generation_with_all_teacher_inputs_is_teacher_forcing(tiny_sizes: dict, audio_batch: dict) -> None:
    student = _student(tiny_sizes)
    with torch.no_grad():
        front_end, mask = student.features(audio_batch)
        teacher_inputs = [torch.randn(2, 149, 32) for _ in range(2)]
        forced = student.teacher_forced(front_end, mask, teacher_inputs)
        all_teacher = student.generate(front_end, mask, teacher_inputs, torch.ones(2, 2, dtype=torch.bool))
        mixed = student.generate(front_end, mask, teacher_inputs, torch.tensor([[True, True], [False, False]]))
        own = student.generate(front_end, mask)
    for a, b in zip(forced, all_teacher):
        assert torch.allclose(a[mask], b[mask], atol=1e-5)
    assert torch.allclose(mixed[2][0], forced[2][0], atol=1e-5)  # utterance 0 used the teacher's inputs
    assert torch.allclose(mixed[2][1][mask[1]], own[2][1][mask[1]], atol=1e-5)  # utterance 1 its own


def test_forward_signals_returns_generated_layers_and_frame_mask(tiny_sizes: dict, audio_batch: dict) -> None:
    student = _student(tiny_sizes)
    with torch.no_grad():
        signals = student.forward_signals(audio_batch, SignalRequest())
        front_end, mask = student.features(audio_batch)
        generated = student.generate(front_end, mask)
    assert signals.extra["teacher_layers"] == (0, 2, 3, 4)
    assert len(signals.hidden_states) == 4
    assert torch.equal(signals.extra["frame_mask"].sum(1), torch.tensor([149, 99]))
    assert torch.allclose(signals.hidden_states[3], generated[2])
    # Different widths: the front end (32) cannot be stacked with the teacher-width layers (24).
    narrow = _student(tiny_sizes, teacher_dim=24)
    with torch.no_grad():
        signals = narrow.forward_signals(audio_batch, SignalRequest())
    assert [h.shape[-1] for h in signals.hidden_states] == [24, 24, 24] and signals.extra["teacher_layers"] == (2, 3, 4)


def test_sampling_probability_schedule() -> None:
    method = GenDistillerMethod.__new__(GenDistillerMethod)
    method.config = GenDistillerConfig(train_inputs="teacher", sampling_start=0.0, sampling_end=0.5)
    method.total_steps = 11
    assert [round(method.sampling_probability(step), 3) for step in (0, 5, 10, 20)] == [0.0, 0.25, 0.5, 0.5]
    method.config = GenDistillerConfig(train_inputs="teacher", sampling_start=0.3, sampling_end=0.9,
                                       sampling_schedule="constant")
    assert method.sampling_probability(7) == 0.3


def test_config_rejects_bad_sizes_and_layer_zero(tiny_sizes: dict) -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GenDistillerStudentConfig(**{**tiny_sizes, "num_heads": 5})
    with pytest.raises(ValueError, match="start above 0"):
        GenDistillerStudentConfig(**{**tiny_sizes, "target_layers": [0, 2]})
    with pytest.raises(ValueError, match="increasing"):
        GenDistillerStudentConfig(**{**tiny_sizes, "target_layers": [4, 2]})


def test_factory_uses_teacher_width_and_initialises_generator(tiny_sizes: dict, teacher_factory, tmp_path) -> None:
    teacher = teacher_factory("hubert", layers=4)
    config = GenDistillerStudentConfig(**{**tiny_sizes, "num_layers": 1, "target_layers": [2, 3, 4]})
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0, teacher=teacher)
    student = GenDistillerStudentFactory().build(config, context)
    assert student.teacher_dim == 32
    source = teacher.model.encoder.layers[0].feed_forward.intermediate_dense.weight
    assert torch.equal(student.generator[0].feed_forward["intermediate_dense"].weight, source)
    assert student.parameter_count_excluding() == student.num_parameters()


def test_generator_from_a_whisper_teacher_copies_or_says_why_not(tiny_sizes: dict, tmp_path) -> None:
    """init_from_teacher: true takes a Whisper teacher's first layers into a fitting generator and refuses one
    whose FFN differs (it used to be ignored); auto leaves a Whisper teacher alone."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from kd_plugins.speech.teachers import WhisperEncoderTeacher
    from kdcore.errors import KDUserError

    torch.manual_seed(3)
    teacher = WhisperEncoderTeacher(WhisperEncoder(WhisperConfig(
        num_mel_bins=80, d_model=32, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=64,
        max_source_positions=64)).eval(), 80).freeze()
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0, teacher=teacher)
    sizes = {**tiny_sizes, "num_layers": 1, "target_layers": [2, 3, 4], "layer_norm_first": True}
    student = GenDistillerStudentFactory().build(GenDistillerStudentConfig(**sizes, init_from_teacher=True), context)
    assert torch.equal(student.generator[0].feed_forward["output_dense"].weight, teacher.encoder.layers[0].fc2.weight)
    with pytest.raises(KDUserError, match="shapes differ"):
        GenDistillerStudentFactory().build(GenDistillerStudentConfig(**{**sizes, "ffn_dim": 48},
                                                                     init_from_teacher=True), context)
    kept = GenDistillerStudentFactory().build(GenDistillerStudentConfig(**sizes), context)
    assert not torch.equal(kept.generator[0].feed_forward["output_dense"].weight, teacher.encoder.layers[0].fc2.weight)
