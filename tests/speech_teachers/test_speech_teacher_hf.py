"""WavLM/HuBERT teachers: tiny random models saved with save_pretrained (nothing is downloaded)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import HubertConfig, HubertModel, WavLMConfig, WavLMModel

from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kdcore.registry import Registry
from kdcore.signals import Signal, SignalRequest
from kd_plugins.speech.speech_signals import align_frames
from kd_plugins.speech.teacher_shape import teacher_hidden_size, teacher_num_layers
from kd_plugins.speech.waveforms import conv_output_lengths
from kd_plugins.speech.teachers import (
    HUBERT_BASE_CONFIG, HubertTeacherFactory, WavLMTeacherFactory,
)

TINY_CONV = [[16, 10, 5], [16, 3, 2], [16, 2, 2]]
REQUEST = SignalRequest(frozenset({Signal.HIDDEN_STATES}))


def tiny_config(kind: str, layers: int = 3) -> WavLMConfig | HubertConfig:
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                  conv_dim=[c for c, _, _ in TINY_CONV], conv_kernel=[k for _, k, _ in TINY_CONV],
                  conv_stride=[s for _, _, s in TINY_CONV], conv_bias=False, feat_extract_norm="group",
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    return WavLMConfig(num_buckets=32, max_bucket_distance=64, **common) if kind == "wavlm" else HubertConfig(**common)


@pytest.fixture
def context(tmp_path: Path) -> BuildContext:
    return BuildContext(task=None, cache_dir=tmp_path / "cache", device=torch.device("cpu"), seed=0)  # type: ignore[arg-type]


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    waveform = torch.randn(3, 3000, generator=generator)
    waveform[1, 2000:] = 0.0
    waveform[2, 2500:] = 0.0
    return {"waveform": waveform, "waveform_lengths": torch.tensor([3000, 2000, 2500])}


def _save(kind: str, directory: Path) -> torch.nn.Module:
    torch.manual_seed(1)
    model = (WavLMModel if kind == "wavlm" else HubertModel)(tiny_config(kind)).eval()
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("factory_cls", [WavLMTeacherFactory, HubertTeacherFactory])
def test_local_directory_teacher_exposes_every_layer_and_the_frame_mask(factory_cls, tmp_path, context, batch):
    reference = _save(factory_cls.kind, tmp_path / "model")
    teacher = factory_cls().build(factory_cls.Config(source=str(tmp_path / "model"), cache=False), context).freeze()
    signals = teacher.signals(batch, REQUEST)
    hidden, mask = signals.hidden_states, signals.extra["frame_mask"]
    assert len(hidden) == 3 + 1 and all(state.shape == (3, 149, 32) for state in hidden)
    expected_frames = conv_output_lengths(batch["waveform_lengths"], TINY_CONV)
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == expected_frames.tolist() == [149, 99, 124]
    # Each utterance's states equal a solo, unpadded run of the saved model (weights really loaded).
    for row, length in enumerate(batch["waveform_lengths"].tolist()):
        with torch.no_grad():
            solo = reference(batch["waveform"][row:row + 1, :length], output_hidden_states=True).hidden_states
        frames = int(expected_frames[row])
        for layer, state in enumerate(solo):
            torch.testing.assert_close(hidden[layer][row, :frames], state[0], atol=1e-5, rtol=1e-4)
        assert hidden[-1][row, frames:].abs().sum() == 0  # padding frames are zero
    # Layer 0 is the pre-transformer output (CNN, projection, positional conv, layer norm).
    assert teacher_hidden_size(teacher) == 32 and teacher_num_layers(teacher) == 3


def test_states_do_not_depend_on_batch_neighbours(tmp_path, context, batch):
    _save("wavlm", tmp_path / "model")
    teacher = WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source=str(tmp_path / "model"), cache=False), context)
    together = teacher.signals(batch, REQUEST).hidden_states
    alone = teacher.signals({"waveform": batch["waveform"][1:2, :2000], "waveform_lengths": torch.tensor([2000])},
                            REQUEST).hidden_states
    for both, single in zip(together, alone):
        torch.testing.assert_close(both[1, :99], single[0], atol=1e-6, rtol=0)


def test_padded_batching_masks_padding(tmp_path, context, batch):
    _save("hubert", tmp_path / "model")
    config = HubertTeacherFactory.Config(source=str(tmp_path / "model"), batching="padded", cache=False)
    signals = HubertTeacherFactory().build(config, context).signals(batch, REQUEST)
    assert signals.extra["frame_mask"].sum(1).tolist() == [149, 99, 124]
    assert signals.hidden_states[2][1, 99:].abs().sum() == 0


def test_student_frames_align_with_the_teacher(tmp_path, context, batch):
    from kd_plugins.speech.front_end import SpeechFrontEnd
    from kd_plugins.speech.student_base import SpeechStudentConfig

    _save("wavlm", tmp_path / "model")
    teacher = WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source=str(tmp_path / "model"), cache=False), context)
    signals = teacher.signals(batch, REQUEST)
    front = SpeechFrontEnd(SpeechStudentConfig(conv_layers=TINY_CONV, hidden_size=32, num_heads=4, ffn_dim=64,
                                               pos_conv_kernel=16, pos_conv_groups=4))
    _, student_mask = front(batch["waveform"], batch["waveform_lengths"])
    frames, mask = align_frames(student_mask, signals.extra["frame_mask"], signals.hidden_states[0].shape[1], 0)
    assert frames == 149 and torch.equal(mask, student_mask)


def test_named_configs_build_the_base_architectures_without_downloading(context) -> None:
    wavlm = WavLMTeacherFactory().build(WavLMTeacherFactory.Config(config="base-plus"), context)
    assert round(wavlm.num_parameters() / 1e6, 1) == 94.4  # transformers' WavLMModel of microsoft/wavlm-base-plus
    assert teacher_num_layers(wavlm) == 12 and teacher_hidden_size(wavlm) == 768
    with torch.device("meta"):
        hubert = HubertModel(HubertConfig(**HUBERT_BASE_CONFIG))
    assert round(sum(p.numel() for p in hubert.parameters()) / 1e6, 1) == 94.4  # HuBERT Base (paper: 94.68M)
    # A config mapping works too (the students' paper presets pass one), and names are checked.
    mapping = WavLMTeacherFactory.Config(config=tiny_config("wavlm").to_dict())
    assert teacher_num_layers(WavLMTeacherFactory().build(mapping, context)) == 3
    with pytest.raises(KDUserError, match="known: base-plus"):
        WavLMTeacherFactory().build(WavLMTeacherFactory.Config(config="large"), context)


def test_hub_id_is_loaded_local_files_only_unless_downloads_are_allowed(monkeypatch, context) -> None:
    calls: list[tuple[str, dict]] = []
    model = WavLMModel(tiny_config("wavlm"))

    def fake_config(location, **options):
        calls.append(("config", {"location": location, **options}))
        return tiny_config("wavlm")

    def fake_model(location, **options):
        calls.append(("model", {"location": location, **options}))
        return model

    def no_preprocessor(location, **options):
        calls.append(("preprocessor", {"location": location, **options}))
        raise OSError("no preprocessor_config.json")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", fake_config)
    monkeypatch.setattr("transformers.Wav2Vec2FeatureExtractor.from_pretrained", no_preprocessor)
    monkeypatch.setattr(WavLMModel, "from_pretrained", fake_model)
    teacher = WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source="microsoft/wavlm-base-plus", cache=False),
                                           context)
    assert teacher.model is model and not teacher.normalize_waveform  # group-norm CNN: raw waveform
    assert [kind for kind, _ in calls] == ["config", "model", "preprocessor"]
    assert all(c["location"] == "microsoft/wavlm-base-plus" and c["local_files_only"] is True for _, c in calls)
    assert all("trust_remote_code" not in c for _, c in calls)
    calls.clear()
    WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source="microsoft/wavlm-base-plus",
                                                           allow_download=True), context)
    assert all(c["local_files_only"] is False for _, c in calls)


def test_missing_hub_model_says_which_and_how_to_get_it(context) -> None:
    config = WavLMTeacherFactory.Config(source="microsoft/wavlm-base-plus")
    with pytest.raises(KDUserError) as error:
        WavLMTeacherFactory().build(config, context)
    message = str(error.value)
    assert "microsoft/wavlm-base-plus" in message and "huggingface-cli download" in message
    assert "allow_download" in message
    with pytest.raises(KDUserError, match="does not exist"):
        HubertTeacherFactory().build(HubertTeacherFactory.Config(source="./no/such/dir"), context)


def test_wrong_model_type_is_a_user_error(tmp_path, context) -> None:
    _save("hubert", tmp_path / "hubert")
    with pytest.raises(KDUserError, match="'hubert' model.*Use teacher name 'hubert'"):
        WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source=str(tmp_path / "hubert")), context)


def test_too_short_audio_is_a_user_error(tmp_path, context) -> None:
    _save("wavlm", tmp_path / "model")
    teacher = WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source=str(tmp_path / "model"), cache=False), context)
    with pytest.raises(KDUserError, match="too short"):
        teacher.signals({"waveform": torch.zeros(1, 10), "waveform_lengths": torch.tensor([10])}, REQUEST)


def test_registry_names_the_speech_teachers() -> None:
    registry = Registry.discover(entry_points=False)
    assert registry.load("teacher", "wavlm") is WavLMTeacherFactory
    assert registry.load("teacher", "hubert") is HubertTeacherFactory
    assert registry.load("teacher", "whisper-encoder").name == "whisper-encoder"
