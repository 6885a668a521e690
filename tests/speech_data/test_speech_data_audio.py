"""Reading user audio: bad files are skipped or fixed and counted, never a crash."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from kd_tasks.speech.audio import AudioReadStats, SkipReason, read_audio
from kd_tasks.speech.corpora import load_audio_folder
from kdcore.errors import KDUserError


def _tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def make_bad_folder(root: Path) -> Path:
    """One file of every kind a user folder may hold (what each becomes is in EXPECTED)."""
    root.mkdir(parents=True, exist_ok=True)
    soundfile.write(root / "good.wav", _tone(0.5, 16000), 16000, subtype="PCM_16")
    (root / "empty.wav").write_bytes(b"")
    (root / "random.wav").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (root / "truncated.flac").write_bytes(b"fLaC\x00\x00\x00\x22" + bytes(20))
    stereo = np.stack([_tone(0.5, 44100, 440.0), _tone(0.5, 44100, 660.0)], axis=1)
    soundfile.write(root / "stereo_44k.wav", stereo, 44100, subtype="PCM_16")
    (root / "sub").mkdir()
    soundfile.write(root / "sub" / "narrow_8k.flac", _tone(0.5, 8000), 8000)
    nan = _tone(0.5, 16000)
    nan[100:110] = np.nan
    soundfile.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    soundfile.write(root / "silent.wav", np.zeros(8000, np.float32), 16000, subtype="PCM_16")
    soundfile.write(root / "short.wav", _tone(0.01, 16000), 16000, subtype="PCM_16")
    soundfile.write(root / "clipped.wav", np.clip(_tone(0.5, 16000, amplitude=3.0), -1, 1), 16000, subtype="PCM_16")
    soundfile.write(root / "vorbis.ogg", _tone(0.5, 16000), 16000, format="OGG", subtype="VORBIS")
    soundfile.write(root / "lossy.mp3", _tone(0.5, 22050), 22050, format="MP3", subtype="MPEG_LAYER_III")
    (root / "notes.txt").write_text("not audio, not even looked at")
    return root


# file -> None (used) or the skip kind
EXPECTED = {"good.wav": None, "empty.wav": "empty", "random.wav": "unreadable", "truncated.flac": "unreadable",
            "stereo_44k.wav": None, "sub/narrow_8k.flac": None, "nan.wav": "non_finite", "silent.wav": "silent",
            "short.wav": "too_short", "clipped.wav": None, "vorbis.ogg": None,
            "lossy.mp3": None}


@pytest.fixture
def bad_folder(tmp_path: Path) -> Path:
    return make_bad_folder(tmp_path / "audio")


def test_each_bad_file_is_classified(bad_folder: Path) -> None:
    for name, expected in EXPECTED.items():
        result = read_audio(bad_folder / name)
        if expected is None:
            assert isinstance(result, torch.Tensor), (name, result)
            assert result.dtype == torch.float32 and result.dim() == 1 and torch.isfinite(result).all()
        else:
            assert isinstance(result, SkipReason) and result.kind == expected, (name, result)


def test_stereo_and_8k_are_downmixed_and_resampled(bad_folder: Path) -> None:
    stats = AudioReadStats()
    stereo = read_audio(bad_folder / "stereo_44k.wav", stats=stats)
    narrow = read_audio(bad_folder / "sub" / "narrow_8k.flac", stats=stats)
    assert isinstance(stereo, torch.Tensor) and isinstance(narrow, torch.Tensor)
    assert abs(stereo.numel() - 8000) <= 1 and abs(narrow.numel() - 8000) <= 1  # 0.5 s at 16 kHz
    assert stats.fixed == {"downmixed": 1, "resampled": 2}
    # The 8 kHz tone keeps its pitch after resampling: the spectrum peaks at 440 Hz.
    spectrum = torch.fft.rfft(narrow).abs()
    assert abs(int(spectrum.argmax()) * 16000 / narrow.numel() - 440.0) < 5.0
    # Down-mixing averages the channels: both tones are present at half amplitude.
    spectrum = torch.fft.rfft(stereo).abs()
    bins = [round(f * stereo.numel() / 16000) for f in (440.0, 660.0)]
    assert spectrum[bins[0]] > 0.3 * spectrum.max() and spectrum[bins[1]] > 0.3 * spectrum.max()


def test_folder_loads_good_files_and_counts_skips(bad_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        corpus = load_audio_folder(bad_folder)
    used = sorted(name.rsplit(".", 1)[0] for name, kind in EXPECTED.items() if kind is None)
    assert sorted(item.utterance_id for item in corpus.items) == used
    assert corpus.skipped == {"empty": 1, "unreadable": 2, "non_finite": 1, "silent": 1, "too_short": 1}
    # stereo_44k.wav is down-mixed and resampled, narrow_8k.flac and lossy.mp3 (22.05 kHz) resampled,
    # clipped.wav kept and counted.
    assert corpus.manifest["fixed"] == {"downmixed": 1, "resampled": 3, "clipped": 1}
    assert corpus.manifest["files_seen"] == len(EXPECTED) and corpus.manifest["items"] == len(used)
    assert all(item.text is None and item.keyword is None and item.speaker is None for item in corpus.items)
    log = caplog.text
    assert "skipped 2 file(s) as unreadable" in log and "random.wav" in log and "1 clipped file(s) kept" in log


def test_folder_limit_and_user_errors(bad_folder: Path, tmp_path: Path) -> None:
    assert len(load_audio_folder(bad_folder, limit=2).items) == 2
    with pytest.raises(KDUserError, match="does not exist"):
        load_audio_folder(tmp_path / "missing")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(KDUserError, match="holds no"):
        load_audio_folder(tmp_path / "texts")
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "a.wav").write_bytes(b"")
    with pytest.raises(KDUserError, match="all skipped"):
        load_audio_folder(only_bad)
