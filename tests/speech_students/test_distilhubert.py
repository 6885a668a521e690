"""DistilHuBERT student: layers, heads, teacher initialisation, errors."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from kd_plugins.speech.distilhubert import DistilHubertStudent, DistilHubertStudentConfig, DistilHubertStudentFactory
from kd_plugins.speech.speech_signals import align_frames, teacher_layers
from kd_plugins.speech.teacher_init import init_from_teacher
from kd_plugins.speech.waveforms import conv_output_lengths
from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kdcore.signals import SignalRequest, Signals


def _context(tmp_path, teacher=None) -> BuildContext:  # noqa: ANN001
    return BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0, teacher=teacher)


def test_forward_signals_are_the_students_own_layers(tiny_sizes: dict, audio_batch: dict) -> None:
    student = DistilHubertStudent(DistilHubertStudentConfig(**tiny_sizes), teacher_dim=24).eval()
    with torch.no_grad():
        signals = student.forward_signals(audio_batch, SignalRequest())
        predictions, mask = student.predict(audio_batch)
    assert [h.shape for h in signals.hidden_states] == [(2, 149, 32)] * 3  # front end + 2 layers
    assert torch.equal(signals.extra["frame_mask"], mask)
    assert [p.shape for p in predictions] == [(2, 149, 24)] * 3  # one head per target layer
    assert mask.sum(1).tolist() == conv_output_lengths(torch.tensor([3000, 2000]), student.front_end.conv_layers).tolist()


def test_heads_are_excluded_from_the_deployed_count(tiny_sizes: dict) -> None:
    student = DistilHubertStudent(DistilHubertStudentConfig(**tiny_sizes), teacher_dim=24)
    heads = 3 * (32 * 24 + 24)
    assert student.num_parameters() - student.parameter_count_excluding() == heads


def test_init_from_hubert_teacher_reproduces_its_first_layers(tiny_sizes: dict, audio_batch: dict,
                                                              teacher_factory, tmp_path) -> None:
    """Copied weights: the student's front end and 2 layers compute the teacher's hidden states 0..2 exactly."""
    teacher = teacher_factory("hubert", layers=4)
    config = DistilHubertStudentConfig(**tiny_sizes, init_from_teacher=True, dropout=0.0, attention_dropout=0.0,
                                       activation_dropout=0.0)
    student = DistilHubertStudentFactory().build(config, _context(tmp_path, teacher)).eval()
    one = {"waveform": audio_batch["waveform"][:1], "waveform_lengths": audio_batch["waveform_lengths"][:1]}
    with torch.no_grad():
        mine = student.forward_signals(one, SignalRequest()).hidden_states
        theirs = teacher.signals(one, SignalRequest()).hidden_states
    for index in range(3):
        assert torch.allclose(mine[index], theirs[index], atol=1e-4), index


def test_init_from_wavlm_teacher_copies_weights(tiny_sizes: dict, teacher_factory, tmp_path) -> None:
    teacher = teacher_factory("wavlm", layers=4)
    student = DistilHubertStudentFactory().build(DistilHubertStudentConfig(**tiny_sizes), _context(tmp_path, teacher))
    model = teacher.model
    assert torch.equal(student.front_end.feature_extractor.conv_layers[0].conv.weight,
                       model.feature_extractor.conv_layers[0].conv.weight)
    assert torch.equal(student.front_end.feature_projection.projection.weight,
                       model.feature_projection.projection.weight)
    assert torch.equal(student.front_end.pos_conv_embed.conv.parametrizations.weight.original1,
                       model.encoder.pos_conv_embed.conv.parametrizations.weight.original1)
    for mine, theirs in zip(student.layers, model.encoder.layers):
        attention = theirs.attention
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        assert torch.equal(mine.attention.in_proj_weight, qkv)
        assert torch.equal(mine.attention.out_proj.weight, attention.out_proj.weight)
        assert torch.equal(mine.final_layer_norm.weight, theirs.final_layer_norm.weight)
    # Without initialisation the weights are the student's own random ones.
    fresh = DistilHubertStudentFactory().build(DistilHubertStudentConfig(**tiny_sizes, init_from_teacher=False),
                                               _context(tmp_path, teacher))
    assert not torch.equal(fresh.layers[0].attention.out_proj.weight, student.layers[0].attention.out_proj.weight)


def test_init_from_teacher_mismatch(tiny_sizes: dict, teacher_factory, tmp_path) -> None:
    teacher = teacher_factory("wavlm", layers=4)
    wide = DistilHubertStudentConfig(**{**tiny_sizes, "hidden_size": 48})
    student = DistilHubertStudent(wide, teacher_dim=32)
    before = student.front_end.feature_projection.projection.weight.clone()
    assert init_from_teacher(student.front_end, student.layers, teacher, "auto") is False
    assert torch.equal(before, student.front_end.feature_projection.projection.weight)  # untouched
    with pytest.raises(KDUserError, match="init_from_teacher"):
        init_from_teacher(student.front_end, student.layers, teacher, True)


def test_build_errors_are_user_errors(tiny_sizes: dict, teacher_factory, tmp_path) -> None:
    teacher = teacher_factory("wavlm", layers=4)
    with pytest.raises(KDUserError, match="teacher has 4 transformer layers"):
        DistilHubertStudentFactory().build(DistilHubertStudentConfig(**{**tiny_sizes, "target_layers": [4, 8]}),
                                           _context(tmp_path, teacher))
    with pytest.raises(KDUserError, match="teacher_hidden_size"):
        DistilHubertStudentFactory().build(DistilHubertStudentConfig(**tiny_sizes), _context(tmp_path))
    student = DistilHubertStudent(DistilHubertStudentConfig(**tiny_sizes), teacher_dim=32)
    with pytest.raises(KDUserError, match="receptive field"):
        student.forward_signals({"waveform": torch.zeros(1, 10), "waveform_lengths": torch.tensor([10])},
                                SignalRequest())


def test_teacher_layer_selection_and_frame_alignment() -> None:
    states = tuple(torch.full((1, 5, 2), float(i)) for i in range(13))
    assert [int(t[0, 0, 0]) for t in teacher_layers(Signals(hidden_states=states), [4, 8, 12])] == [4, 8, 12]
    only = states[4:5] + states[8:9]
    assert [int(t[0, 0, 0]) for t in teacher_layers(Signals(hidden_states=only), [4, 8])] == [4, 8]
    with pytest.raises(KDUserError, match="target_layers"):
        teacher_layers(Signals(hidden_states=states[:5]), [4, 8])
    student_mask = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    teacher_mask = torch.tensor([[True] * 7 + [False] * 2, [True] * 9])
    frames, mask = align_frames(student_mask, teacher_mask, 9, max_mismatch=2)
    assert frames == 8 and mask.sum(1).tolist() == [6, 8]
    with pytest.raises(KDUserError, match="frame rates differ"):
        align_frames(student_mask, torch.ones(2, 20, dtype=torch.bool), 20, max_mismatch=2)


def test_automatic_target_layers(tiny_sizes: dict, teacher_factory, tmp_path) -> None:
    from kd_plugins.speech.teacher_shape import evenly_spaced_layers

    assert evenly_spaced_layers(12, 3) == [4, 8, 12]
    assert evenly_spaced_layers(4, 3) == [1, 3, 4]
    assert evenly_spaced_layers(2, 3) == [1, 2]
    teacher = teacher_factory("wavlm", layers=4)
    config = DistilHubertStudentConfig(**{**tiny_sizes, "target_layers": None})
    student = DistilHubertStudentFactory().build(config, _context(tmp_path, teacher))
    assert student.target_layers == (1, 3, 4) and len(student.heads) == 3


def test_teacher_without_transformers_config_is_probed(tiny_sizes: dict, tmp_path) -> None:
    """A teacher known only by its signals: width and depth come from one run on silence."""
    from kdcore.interfaces import Teacher

    class SignalsOnlyTeacher(Teacher):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward_signals(self, batch, request):  # noqa: ANN001, ANN202
            frames = batch["waveform"].shape[1] // 320
            return Signals(hidden_states=tuple(torch.zeros(1, frames, 40) for _ in range(7)))

    config = DistilHubertStudentConfig(**{**tiny_sizes, "target_layers": None, "num_targets": 2})
    student = DistilHubertStudentFactory().build(config, _context(tmp_path, SignalsOnlyTeacher().freeze()))
    assert student.teacher_dim == 40 and student.target_layers == (3, 6)


def test_s3prl_student_options(tiny_sizes: dict, audio_batch: dict) -> None:
    """`head: mlp` is one two-layer MLP per target layer; the s3prl layout has no LayerNorm before the projection."""
    config = DistilHubertStudentConfig(**tiny_sizes, head="mlp", front_end_layout="s3prl")
    student = DistilHubertStudent(config, teacher_dim=24)
    plain = DistilHubertStudent(DistilHubertStudentConfig(**tiny_sizes), teacher_dim=24)
    assert student.num_parameters() - student.parameter_count_excluding() == 3 * (32 * 32 + 32 + 32 * 24 + 24)
    assert plain.parameter_count_excluding() - student.parameter_count_excluding() == 2 * 16  # LayerNorm(16)
    assert not hasattr(student.front_end.feature_projection, "layer_norm")
    predictions, _ = student.predict(audio_batch)
    assert [p.shape for p in predictions] == [(2, 149, 24)] * 3


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_feature_grad_mult_scales_the_cnns_gradient(tiny_sizes: dict, audio_batch: dict, scale: float) -> None:
    """The CNN's gradient is ``scale`` times the unscaled one (0: the CNN is frozen); the rest is unchanged."""
    grads = {}
    for mult in (1.0, scale):
        torch.manual_seed(0)
        student = DistilHubertStudent(DistilHubertStudentConfig(**tiny_sizes, feature_grad_mult=mult, dropout=0.0,
                                                                attention_dropout=0.0, activation_dropout=0.0), 24)
        predictions, _ = student.predict(audio_batch)
        sum(p.square().mean() for p in predictions).backward()
        grads[mult] = (student.front_end.feature_extractor.conv_layers[0].conv.weight.grad,
                       student.front_end.feature_projection.projection.weight.grad)
    (cnn, projection), (scaled_cnn, scaled_projection) = grads[1.0], grads[scale]
    assert torch.allclose(scaled_projection, projection, atol=1e-6)
    if scale == 0.0:
        assert scaled_cnn is None
    else:
        assert torch.allclose(scaled_cnn, scale * cnn, rtol=1e-4, atol=1e-8)


def test_s3prl_student_preset_keeps_the_tasks_sizes_and_recipe() -> None:
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    registry = Registry.discover(entry_points=False)
    default = resolve_run(registry, task="superb", plugin="distilhubert")
    s3prl = resolve_run(registry, task="superb", plugin="distilhubert", preset="s3prl-student")
    args = s3prl.student_config
    assert (args.head, args.front_end_layout, args.feature_grad_mult) == ("mlp", "s3prl", 0.1)
    assert args.hidden_size == default.student_config.hidden_size and s3prl.config.trainer == default.config.trainer
    assert (default.student_config.head, default.student_config.front_end_layout) == ("linear", "transformers")


def _whisper_teacher(layers: int = 4, heads: int = 4) -> Any:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from kd_plugins.speech.teachers import WhisperEncoderTeacher

    torch.manual_seed(3)
    config = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=layers, encoder_attention_heads=heads,
                           encoder_ffn_dim=64, max_source_positions=64, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0)
    return WhisperEncoderTeacher(WhisperEncoder(config).eval(), 80).freeze()


def test_init_from_a_whisper_teacher_copies_its_first_layers(tiny_sizes: dict, tmp_path) -> None:
    """A pre-LN student with Whisper's head count takes Whisper's first layers: each computes what the Whisper
    layer computes (Whisper's key projection has no bias); the CNN front end stays the student's own."""
    teacher = _whisper_teacher()
    sizes = {**tiny_sizes, "layer_norm_first": True, "dropout": 0.0, "attention_dropout": 0.0,
             "activation_dropout": 0.0, "init_from_teacher": True}
    student = DistilHubertStudentFactory().build(DistilHubertStudentConfig(**sizes), _context(tmp_path, teacher)).eval()
    hidden = torch.randn(2, 7, 32)
    with torch.no_grad():
        for mine, theirs in zip(student.layers, teacher.encoder.layers):
            torch.testing.assert_close(mine(hidden), theirs(hidden, None), atol=1e-5, rtol=1e-5)
    random = DistilHubertStudentFactory().build(DistilHubertStudentConfig(**{**sizes, "init_from_teacher": False}),
                                                _context(tmp_path, teacher))
    assert torch.equal(random.front_end.feature_extractor.conv_layers[0].conv.weight,
                       student.front_end.feature_extractor.conv_layers[0].conv.weight)  # same seed: not copied
    # A post-LN student, or one with other heads, cannot take Whisper's layers: true refuses, auto keeps random.
    with pytest.raises(KDUserError, match="pre-LN"):
        DistilHubertStudentFactory().build(DistilHubertStudentConfig(**{**sizes, "layer_norm_first": False}),
                                           _context(tmp_path, teacher))
    with pytest.raises(KDUserError, match="num_heads: 2"):
        DistilHubertStudentFactory().build(DistilHubertStudentConfig(**sizes), _context(tmp_path, _whisper_teacher(heads=2)))
    # auto never copies a Whisper teacher's layers (opt-in: the student's front end stays random).
    kept = DistilHubertStudentFactory().build(DistilHubertStudentConfig(**{**sizes, "init_from_teacher": "auto"}),
                                              _context(tmp_path, teacher))
    assert torch.equal(kept.layers[0].attention.in_proj_weight, random.layers[0].attention.in_proj_weight)
