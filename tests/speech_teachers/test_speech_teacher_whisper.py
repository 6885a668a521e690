"""Whisper encoder teacher on a tiny random transformers Whisper (saved with save_pretrained; no download)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kdcore.signals import Signal, SignalRequest
from kd_plugins.speech.front_end import DEFAULT_CONV_LAYERS
from kd_plugins.speech.teacher_shape import teacher_hidden_size, teacher_num_layers
from kd_plugins.speech.waveforms import conv_output_lengths
from kd_plugins.speech.teachers import WhisperEncoderTeacherFactory

REQUEST = SignalRequest(frozenset({Signal.HIDDEN_STATES}))


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Whisper whose positional table covers 1 s (50 frames = 100 mel frames)."""
    config = WhisperConfig(vocab_size=100, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=50, max_target_positions=20,
                           decoder_start_token_id=1, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-whisper")
    WhisperForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture
def teacher(whisper_dir: Path, tmp_path: Path):  # noqa: ANN201
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0)  # type: ignore[arg-type]
    config = WhisperEncoderTeacherFactory.Config(source=str(whisper_dir), cache=False)
    return WhisperEncoderTeacherFactory().build(config, context).freeze()


def _speechlike(samples: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(samples) / 16000
    tone = torch.sin(2 * torch.pi * (150 + 50 * torch.sin(2 * torch.pi * 2 * time)) * time)
    return 0.3 * tone * (1 + torch.sin(2 * torch.pi * 4 * time)) + 0.01 * torch.randn(samples, generator=generator)


def test_full_window_equals_the_transformers_encoder(teacher) -> None:
    # A clip that fills the positional table exactly is what WhisperEncoder.forward accepts: outputs must agree.
    waveform = _speechlike(16000, 0)[None]
    signals = teacher.signals({"waveform": waveform, "waveform_lengths": torch.tensor([16000])}, REQUEST)
    features = teacher.log_mel(waveform)
    assert features.shape == (1, 80, 100)
    with torch.no_grad():
        reference = teacher.encoder(features, output_hidden_states=True)
    torch.testing.assert_close(signals.hidden_states[-1], reference.last_hidden_state, atol=1e-5, rtol=1e-4)
    # Same layer convention as transformers: embeddings, then each layer, the last after the final layer norm.
    assert len(signals.hidden_states) == len(reference.hidden_states) == 2 + 1
    for ours, theirs in zip(signals.hidden_states, reference.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert signals.hidden_states[0].shape == (1, 50, 32)


def test_short_clips_run_on_their_own_frames(teacher) -> None:
    lengths = torch.tensor([12000, 8000, 12000])
    waveform = torch.stack([_speechlike(12000, seed) for seed in range(3)])
    waveform[1, 8000:] = 0.0
    signals = teacher.signals({"waveform": waveform, "waveform_lengths": lengths}, REQUEST)
    mask = signals.extra["frame_mask"]
    # 10 ms mel hop, conv stride 2: ceil((samples // 160) / 2) frames of 20 ms.
    assert mask.sum(1).tolist() == [38, 25, 38] and signals.hidden_states[0].shape == (3, 38, 32)
    # Within 1-2 frames of a HuBERT-style CNN student's count (320-sample hop), as align_frames allows.
    student = conv_output_lengths(lengths, DEFAULT_CONV_LAYERS)
    assert (mask.sum(1) - student).abs().max() <= 2
    # The short clip's states equal a solo run (no dependence on padding or neighbours) and padding is zero.
    solo = teacher.signals({"waveform": waveform[1:2, :8000], "waveform_lengths": torch.tensor([8000])}, REQUEST)
    for both, single in zip(signals.hidden_states, solo.hidden_states):
        torch.testing.assert_close(both[1, :25], single[0], atol=1e-6, rtol=0)
        assert both[1, 25:].abs().sum() == 0
    assert teacher_hidden_size(teacher) == 32 and teacher_num_layers(teacher) == 2


def test_long_clips_are_cut_into_encoder_windows(teacher) -> None:
    waveform = _speechlike(40000, 1)[None]  # 2.5 windows of 1 s
    signals = teacher.signals({"waveform": waveform, "waveform_lengths": torch.tensor([40000])}, REQUEST)
    assert signals.hidden_states[-1].shape[1] == 50 + 50 + 25
    first = teacher.signals({"waveform": waveform[:, :16000], "waveform_lengths": torch.tensor([16000])}, REQUEST)
    torch.testing.assert_close(signals.hidden_states[-1][:, :50], first.hidden_states[-1], atol=1e-6, rtol=0)


def test_missing_whisper_source_is_a_user_error(tmp_path: Path) -> None:
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0)  # type: ignore[arg-type]
    with pytest.raises(KDUserError, match="openai/whisper-base.*huggingface-cli download"):
        WhisperEncoderTeacherFactory().build(WhisperEncoderTeacherFactory.Config(source="openai/whisper-base"),
                                             context)
    with pytest.raises(KDUserError, match="does not exist"):
        WhisperEncoderTeacherFactory().build(WhisperEncoderTeacherFactory.Config(source="/no/such/whisper"),
                                             context)
