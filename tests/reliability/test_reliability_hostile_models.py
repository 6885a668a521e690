"""Mismatched teacher and student: a clear error before training goes wrong, or a working cross-tokenizer run.

Text (task ``wmt``, preset ``tiny``, in-process): a teacher whose tokenizer differs from the
student's must give a :class:`~kdcore.errors.KDUserError` for token-level objectives and
plugins, and train normally with the cross-tokenizer objective ``uld``; a head with padding rows
beyond the one shared tokenizer trains with token-level objectives; hidden-state
objectives between layers of different widths give a KDUserError; over-long sequences are
truncated with a warning. Speech: a DistilHuBERT student whose prediction heads are sized for
another teacher width gives a KDUserError.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kdcore import runner
from kdcore.errors import KDUserError
from kdcore.registry import Registry
from kdcore.resolve import resolve_run

pytest.importorskip("kd_tasks.text.wmt")
REGISTRY = Registry.discover(entry_points=False)
QUICK = ["trainer.progress=off", "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2",
         "trainer.evaluate_teacher=false", "data.max_train=64", "data.max_test=8", "data.max_valid=8",
         "data.eval_beams=[1]"]
# The tiny wmt tokenizer has 600 tokens; the teacher gets one of its own (2 teacher steps: only its shape counts).
OTHER_TOKENIZER = ("data.teacher_vocab_size=700", "teacher.args.train_steps=2")
PADDED_HEAD = "student.args.config.vocab_size=700"  # 100 rows beyond the shared tokenizer


def _run(tmp_path: Path, plugin: str, *sets: str) -> dict:
    resolved = resolve_run(REGISTRY, task="wmt", plugin=plugin, preset="tiny", sets=[*QUICK, *sets])
    return runner.run(resolved, REGISTRY, tmp_path / "run")


def test_token_level_objective_with_another_vocabulary_is_a_user_error(tmp_path: Path, figures) -> None:
    figures.update(hostile_models=1)
    with pytest.raises(KDUserError, match="vocabular"):
        _run(tmp_path, "vanilla", *OTHER_TOKENIZER)


def test_imitation_with_another_vocabulary_is_a_user_error(tmp_path: Path, figures) -> None:
    figures.update(hostile_models=1)
    with pytest.raises(KDUserError, match="passes tokens between teacher and student"):
        _run(tmp_path, "imitation", *OTHER_TOKENIZER)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


def test_cross_tokenizer_objective_trains_with_another_vocabulary(tmp_path: Path, figures) -> None:
    figures.update(hostile_models=1)
    metrics = _run(tmp_path, "vanilla", *OTHER_TOKENIZER, "objectives.kd=null", "objectives.uld={name: uld}")
    assert "bleu" in metrics["student"] and metrics["nonfinite_steps"] == 0


def test_padding_rows_beyond_one_tokenizer_train_with_token_level_objectives(tmp_path: Path, figures) -> None:
    figures.update(hostile_models=1)
    metrics = _run(tmp_path, "vanilla", PADDED_HEAD)
    assert "bleu" in metrics["student"] and metrics["nonfinite_steps"] == 0


def test_hidden_states_of_different_widths_are_a_user_error(tmp_path: Path, figures) -> None:
    figures.update(hostile_models=1)
    with pytest.raises(KDUserError, match="must have the same shape"):
        _run(tmp_path, "vanilla", "objectives.hidden={name: mse}")  # teacher d_model 64, student 32


def test_over_long_sequences_are_truncated_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         figures) -> None:
    with caplog.at_level(logging.WARNING):
        metrics = _run(tmp_path, "vanilla", "data.max_source_tokens=4", "data.max_target_tokens=3")
    figures.update(hostile_models=1)
    assert "truncated" in caplog.text and "max_source_tokens=4" in caplog.text
    assert metrics["nonfinite_steps"] == 0


def test_speech_student_heads_sized_for_another_teacher(tmp_path: Path, figures) -> None:
    """DistilHuBERT heads predicting 48-wide states from a 32-wide teacher: a clear error, not a shape crash."""
    transformers = pytest.importorskip("transformers")
    from kd_plugins.speech.distilhubert import DistilHubertMethod, DistilHubertStudentConfig, DistilHubertStudentFactory

    from kdcore.interfaces import BuildContext, Teacher
    from kdcore.signals import Signals

    conv = [[16, 10, 5], [16, 3, 2], [16, 2, 2]]
    config = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, num_buckets=32,
        max_bucket_distance=64, conv_dim=[c for c, _, _ in conv], conv_kernel=[k for _, k, _ in conv],
        conv_stride=[s for _, _, s in conv], conv_bias=False, feat_extract_norm="group", num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, mask_time_prob=0.0)

    class TinyTeacher(Teacher):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = transformers.WavLMModel(config)

        def forward_signals(self, batch, request):  # noqa: ANN001, ANN201
            output = self.model(batch["waveform"], output_hidden_states=True)
            frames = self.model._get_feat_extract_output_lengths(batch["waveform_lengths"])
            mask = torch.arange(output.hidden_states[0].shape[1])[None, :] < frames[:, None]
            return Signals(hidden_states=tuple(output.hidden_states), extra={"frame_mask": mask})

    teacher = TinyTeacher().freeze()
    student_config = DistilHubertStudentConfig(conv_layers=conv, hidden_size=32, num_heads=4, ffn_dim=64,
                                               pos_conv_kernel=16, pos_conv_groups=4, target_layers=[2, 3, 4],
                                               teacher_hidden_size=48, init_from_teacher=False)
    figures.update(hostile_models=1)
    batch = {"waveform": torch.randn(2, 3000), "waveform_lengths": torch.tensor([3000, 2000])}
    with pytest.raises(KDUserError):
        context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0, teacher=teacher)
        student = DistilHubertStudentFactory().build(student_config, context)
        DistilHubertMethod(DistilHubertMethod.Config(), None, teacher, student, []).training_step(batch, 0)
